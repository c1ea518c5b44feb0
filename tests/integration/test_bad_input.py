"""Bad input through the real `cascade submit`: exit 2, a message naming file, line and field, and
nothing inserted or published, unless --skip-invalid writes the bad rows aside and submits the rest."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import pytest
import yaml

from cascade import producer
from cascade.client import Client
from cascade.config import parse_config
from cascade.errors import InputError
from cascade.publish import CeleryPublisher

pytestmark = pytest.mark.integration

CONFIG = """\
models:
  - {{name: small, base_url: "{url}", model: sim-small, max_retries: 0}}
  - {{name: large, base_url: "{url}", model: sim-large, max_retries: 0}}
task_types:
  - name: classify
    system: You label support tickets.
    prompt: "Ticket {{id}}: {{text}}"
    tiers: [small, {tier2}]
"""
BIG = producer.MAX_ROW_BYTES + 10


@pytest.fixture
def sim_url(sim):
    return sim().url


@pytest.fixture
def cli(env, sim_url, tmp_path):
    """``cli(*args, input=bytes, config=text)`` runs `cascade submit ...` in tmp_path."""

    def run(*args: str, input: bytes | None = None, config: str | None = None) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "cascade.yaml"
        path.write_text(config if config is not None else CONFIG.format(url=sim_url, tier2="large"))
        proc = subprocess.run([sys.executable, "-m", "cascade.cli", "submit", *args], input=input, check=False,
                              env=env.environ(CASCADE_CONFIG=path.name), cwd=tmp_path, capture_output=True,
                              timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                           proc.stderr.decode(errors="replace"))

    return run


def _queues(env):
    publisher = CeleryPublisher.connect(env.settings(), env.settings().broker_url)
    try:
        return publisher.queue_lengths()
    finally:
        publisher.close()


def _flat(text):
    """stderr as one line: rich wraps long messages at 80 columns when stderr is not a terminal."""
    return " ".join(text.split())


def assert_rejected_whole(env, proc, *fragments):
    """Exit 2, nothing on stdout, each fragment in stderr, and no batch, job or message anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in _flat(proc.stderr), (fragment, proc.stderr)
    assert env.scalar("SELECT count(*) FROM batches") == 0
    assert env.scalar("SELECT count(*) FROM jobs") == 0
    assert set(_queues(env).values()) == {0}


def _jsonl(*rows):
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD = [{"id": "a", "text": "printer jammed"}, {"id": "b", "text": "vpn down"}]

# (file name, content, extra args, fragments the message must contain)
BAD_ROWS = {
    "malformed_jsonl": ("rows.jsonl", _jsonl(GOOD[0], b'{"id": "b", "text": }', GOOD[1]), [],
                        ["rows.jsonl:2: malformed JSON: Expecting value at column 21"]),
    "not_utf8": ("rows.jsonl", _jsonl(GOOD[0], GOOD[1], b'{"id": "c", "text": "caf\xe9"}'), [],
                 ["rows.jsonl:3: not UTF-8: byte 0xe9 at column 25"]),
    "missing_field": ("rows.jsonl", _jsonl(GOOD[0], {"id": "b", "body": "vpn down"}), [],
                      ['rows.jsonl:2: column "text" missing for task "classify"']),
    "null_field": ("rows.jsonl", _jsonl(GOOD[0], {"id": "b", "text": None}), [],
                   ['rows.jsonl:2: field "text" is null; expected a string or number']),
    "object_field": ("rows.jsonl", _jsonl(GOOD[0], {"id": "b", "text": {"a": 1}}), [],
                     ['rows.jsonl:2: field "text" is an object']),
    "array_field": ("rows.jsonl", _jsonl({"id": ["a"], "text": "x"}), [], ['rows.jsonl:1: field "id" is an array']),
    "too_big": ("rows.jsonl", _jsonl(GOOD[0], {"id": "b", "text": "x" * BIG}), [],
                [f"rows.jsonl:2: row is {BIG + 23} bytes, over the limit of {producer.MAX_ROW_BYTES}"]),
    "empty_file": ("rows.jsonl", b"", [], ["rows.jsonl: no rows to submit"]),
    "key_missing": ("rows.jsonl", _jsonl(GOOD[0], {"text": "no id", "ID": "c"}), ["--key-field", "ID"],
                    ['rows.jsonl:1: key field "ID" is missing or null; expected a string or integer']),
    "duplicate_key": ("rows.jsonl", _jsonl(GOOD[0], GOOD[1], {"id": "a", "text": "again"}), ["--key-field", "id"],
                      ['rows.jsonl:3: duplicate key "a" in field "id"']),
    "csv_wrong_columns": ("rows.csv", b"id,text\na,printer\nb,vpn,extra\n", [],
                          ["rows.csv:3: 3 columns, the header has 2 (id, text)"]),
    "csv_too_big": ("rows.csv", b"id,text\na,x\nb," + b"y" * BIG + b"\n", [],
                    [f"rows.csv:3: row is {BIG + 2} bytes, over the limit"]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_reject_the_batch_whole(env, cli, tmp_path, case):
    # Given a file with one bad row among good ones
    name, content, args, fragments = BAD_ROWS[case]
    (tmp_path / name).write_bytes(content)
    # When it is submitted
    proc = cli("classify", name, *args)
    # Then exit 2 names file, line and field, and nothing was inserted or published
    assert_rejected_whole(env, proc, *fragments)


def test_message_is_printed_verbatim(env, cli, tmp_path):
    # Given a duplicate key that looks like rich markup and is longer than a terminal line
    key = "[/]" + "k" * 100
    (tmp_path / "rows.jsonl").write_bytes(_jsonl({"id": key, "text": "a"}, {"id": key, "text": "b"}))
    proc = cli("classify", "rows.jsonl", "--key-field", "id")
    assert_rejected_whole(env, proc)
    assert f'rows.jsonl:2: duplicate key "{key}" in field "id"' in proc.stderr


# The same checks in-process (the CLI adds nothing the cases above do not cover): (file, content, message).
MORE_BAD_ROWS = {
    "not_an_object": ("rows.jsonl", _jsonl(GOOD[0], b'["b", "vpn"]'), "rows.jsonl:2: expected a JSON object, got an array"),
    "nan": ("rows.jsonl", _jsonl(GOOD[0], b'{"id": "b", "text": "x", "n": NaN}'), "rows.jsonl:2: malformed JSON: NaN"),
    "overflow": ("rows.jsonl", _jsonl(b'{"id": "b", "text": "x", "n": 1e999}'), "rows.jsonl:1: malformed JSON: 1e999"),
    "deep": ("rows.jsonl", _jsonl(b"[" * 100_000 + b"]" * 100_000), "rows.jsonl:1: malformed JSON: nested too deeply"),
    "nul": ("rows.jsonl", _jsonl(GOOD[0], {"id": "b", "text": "a\u0000b"}),
            'rows.jsonl:2: field "text" contains a NUL character'),
    "surrogate": ("rows.jsonl", _jsonl(b'{"id": "b", "text": "\\ud800"}'),
                  'rows.jsonl:1: field "text" contains a lone surrogate'),
    "blank_lines_only": ("rows.jsonl", "\ufeff\n  \n".encode(), "rows.jsonl: no rows to submit"),
    "csv_missing_column": ("rows.csv", b"id,body\na,printer\n", 'rows.csv:2: column "text" missing for task "classify"'),
    "csv_duplicate_column": ("rows.csv", b"id,text,text\na,b,c\n", 'rows.csv:1: duplicate column "text"'),
    "csv_unclosed_quote": ("rows.csv", b'id,text\na,"printer\nb,vpn\n', "rows.csv:2: malformed CSV: unexpected end of data"),
    "csv_stray_quote": ("rows.csv", b'id,text\na,pr"int"er\nb,"vpn"down\n', "rows.csv:3: malformed CSV: ',' expected"),
    "csv_not_utf8": ("rows.csv", b"id,text\na,caf\xe9\n", "rows.csv:2: not UTF-8: byte 0xe9 at column 6"),
    "csv_header_only": ("rows.csv", "\ufeffid,text\n".encode(), "rows.csv: no rows to submit"),
    "csv_quoted_too_big": ("rows.csv", b'id,text\na,"' + b"y\n" * (BIG // 2) + b'"\n',
                           ("rows.csv:500001: row is 1000002 bytes, over the limit of 1000000 (inside a quoted field "
                            "opened on line 2: an unclosed quote? the rest of the file cannot be read)")),
    "no_file": ("missing.jsonl", None, "missing.jsonl: cannot read: No such file or directory"),
}


@pytest.fixture
def client(env, sim_url):
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    config = parse_config(yaml.safe_load(CONFIG.format(url=sim_url, tier2="large")), "cascade.yaml")
    yield Client(settings, engine=env.engine, publisher=publisher, config=config)
    publisher.close()


@pytest.mark.parametrize("case", list(MORE_BAD_ROWS))
def test_more_bad_rows_in_process(env, client, tmp_path, case):
    name, content, message = MORE_BAD_ROWS[case]
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as caught:
        client.submit("classify", tmp_path / name, key_field="id")
    assert str(caught.value).removeprefix(str(tmp_path) + "/").startswith(message), str(caught.value)
    assert env.scalar("SELECT count(*) FROM batches") + env.scalar("SELECT count(*) FROM jobs") == 0
    assert set(_queues(env).values()) == {0}


def test_fields_of_a_tier_variant_are_required(env, sim_url):
    # Given a tier whose variant's system prompt uses a field no other template uses
    data = yaml.safe_load(CONFIG.format(url=sim_url, tier2="large"))
    data["task_types"][0]["tiers"][1] = {"model": "large", "variants": [
        {"name": "plain", "prompt": "{text}"}, {"name": "local", "prompt": "{text}", "system": "Answer in {lang}."}]}
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    client = Client(settings, engine=env.engine, publisher=publisher, config=parse_config(data, "cascade.yaml"))
    # When a row without that field is submitted, then it is refused before a worker fails to render it
    with pytest.raises(InputError, match='<rows>:1: column "lang" missing for task "classify"'):
        client.submit("classify", [{"id": 1, "text": "a"}])
    client.submit("classify", [{"id": 1, "text": "a", "lang": "fr"}])
    publisher.close()


BAD_CONFIGS = {
    "unknown_model": (CONFIG.replace("{tier2}", "larg"), ["cascade.yaml: task_types[0].tiers[1]: unknown model 'larg' (known: large, small)"]),
    "bad_schema": (CONFIG + "    max_tokens: many\n", ["cascade.yaml: task_types[0].max_tokens: Input should be"]),
    "unknown_key": (CONFIG + "    retries: 3\n", ["cascade.yaml: task_types[0].retries: Extra inputs"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_config_is_exit_2_naming_file_and_field(env, cli, sim_url, tmp_path, case):
    # Given good rows and a broken cascade.yaml
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(*GOOD))
    template, fragments = BAD_CONFIGS[case]
    # When the rows are submitted
    proc = cli("classify", "rows.jsonl", config=template.format(url=sim_url, tier2="large"))
    # Then exit 2 names cascade.yaml and the field path; nothing was inserted
    assert_rejected_whole(env, proc, *fragments)


def test_unknown_task_type_names_the_config(env, cli, tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(*GOOD))
    proc = cli("clasify", "rows.jsonl")
    assert_rejected_whole(env, proc, "cascade.yaml: task_types: unknown task type 'clasify' (known: classify)")


def _assert_submitted(env, proc, keys):
    assert proc.returncode == 0, proc.stderr
    batch_id = proc.stdout.strip()
    assert proc.stdout == batch_id + "\n"
    got = [k for (k,) in env.rows("SELECT key FROM jobs WHERE batch_id = :b ORDER BY id", b=batch_id)]
    assert got == keys
    assert env.scalar("SELECT rows FROM batches WHERE id = :b", b=batch_id) == len(keys)
    # One tier1 message per jobs_per_message jobs (the scenarios check that every job runs)
    assert _queues(env)["tier1"] == -(-len(keys) // env.settings().jobs_per_message)
    return batch_id


def test_bom_jsonl_from_stdin(env, cli):
    # Given JSONL on stdin that starts with a UTF-8 byte order mark
    data = "\ufeff".encode() + _jsonl(*GOOD)
    # When it is submitted as `-`
    proc = cli("classify", "-", input=data)
    # Then the BOM is dropped, not an error, and both rows are queued (keys are line numbers)
    _assert_submitted(env, proc, ["1", "2"])
    assert env.rows("SELECT input FROM jobs ORDER BY id")[0][0] == GOOD[0]


def test_csv_on_stdin_is_detected(env, cli):
    # Given a CSV export piped in without --format (`cat x.csv | cascade submit classify -`)
    data = b"id,text\nt-1,printer\nt-2,vpn\n"
    # When it is submitted as `-`
    proc = cli("classify", "-", "--key-field", "id", input=data)
    # Then it is read as CSV, and stderr says so
    _assert_submitted(env, proc, ["t-1", "t-2"])
    assert "reading <stdin> as CSV" in proc.stderr
    # And --format jsonl still insists on JSONL
    insisted = cli("classify", "-", "--format", "jsonl", input=data)
    assert insisted.returncode == 2 and "<stdin>:1: malformed JSON" in insisted.stderr


def test_csv_with_bom_and_key_field(env, cli, tmp_path):
    # Given a CSV export with a BOM, CRLF line ends, a quoted multi-line field and a blank line
    text = '\ufeffid,text\r\nt-1,"printer, 2nd floor"\r\n\r\nt-2,"vpn\r\ndown"\r\n'
    (tmp_path / "tickets.CSV").write_bytes(text.encode())
    # When it is submitted with --key-field
    proc = cli("classify", "tickets.CSV", "--key-field", "id")
    # Then the keys are the id column and the values are intact
    _assert_submitted(env, proc, ["t-1", "t-2"])
    inputs = [r[0] for r in env.rows("SELECT input FROM jobs ORDER BY id")]
    assert inputs == [{"id": "t-1", "text": "printer, 2nd floor"}, {"id": "t-2", "text": "vpn\r\ndown"}]


def test_skip_invalid_jsonl_writes_exactly_the_bad_rows(env, cli, tmp_path):
    # Given good rows mixed with every kind of bad one, a parse error in the middle included
    lines = [
        GOOD[0],                                    # 1 good
        b'{"id": "x", "text": ',                    # 2 malformed
        GOOD[1],                                    # 3 good
        {"id": "y"},                                # 4 missing field
        b'{"id": "z", "text": "caf\xe9"}',          # 5 not UTF-8
        {"id": "c", "text": "x" * BIG},             # 6 too big
        {"id": "d", "text": None},                  # 7 null
        {"id": "e", "text": "disk full"},           # 8 good
        b"",                                        # 9 blank: skipped, not rejected
        b"42",                                      # 10 not an object
        {"id": "f", "text": "ok"},                  # 11 good
    ]
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(*lines))
    rejects = tmp_path / "out" / "rejects.jsonl"
    rejects.parent.mkdir()
    rejects.write_text("stale line from an earlier run\n")
    # When it is submitted with --skip-invalid
    proc = cli("classify", "rows.jsonl", "--key-field", "id", "--skip-invalid", str(rejects))
    # Then the good rows are submitted and queued, and the rejects file holds exactly the bad ones
    _assert_submitted(env, proc, ["a", "b", "e", "f"])
    assert "4 rows, 6 rejected" in _flat(proc.stderr)
    got = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in got] == [(2, None), (4, "text"), (5, None), (6, None), (7, "text"),
                                                    (10, None)]
    reasons = [r["reason"] for r in got]
    assert reasons[0].startswith("malformed JSON") and got[0]["raw"] == '{"id": "x", "text": '
    assert reasons[1] == 'column "text" missing for task "classify"' and got[1]["row"] == {"id": "y"}
    assert reasons[2].startswith("not UTF-8") and got[2]["raw"] == '{"id": "z", "text": "caf\\xe9"}'
    assert reasons[3].startswith("row is") and got[3]["raw"] is None
    assert reasons[4].startswith('field "text" is null') and got[4]["row"] == {"id": "d", "text": None}
    assert reasons[5] == "expected a JSON object, got int" and got[5]["raw"] == "42"


def test_skip_invalid_csv_goes_on_after_bad_rows(env, cli, tmp_path):
    # Given a CSV with a short row, an over-long row and a non-UTF-8 row between good ones
    body = b"id,text\na,one\nb\nc,three\nd," + b"x" * BIG + b"\ne,caf\xe9\nf,six\n"
    (tmp_path / "rows.csv").write_bytes(body)
    # When it is submitted with --skip-invalid
    proc = cli("classify", "rows.csv", "--key-field", "id", "--skip-invalid", "rejects.jsonl")
    # Then the good rows are queued and the three bad ones are set aside with their lines
    _assert_submitted(env, proc, ["a", "c", "f"])
    got = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in got] == [3, 5, 6]
    assert got[0]["reason"].startswith("1 columns, the header has 2") and got[0]["raw"] == "b"


def test_skip_invalid_cannot_skip_a_broken_quote(env, client, tmp_path):
    # Given a CSV whose quote is never closed: every later row would be read wrong
    (tmp_path / "rows.csv").write_bytes(b'id,text\na,one\nb,"two\nc,three\n')
    # When it is submitted with --skip-invalid, then the whole batch is still refused
    with pytest.raises(InputError, match="rows.csv:3: malformed CSV"):
        client.submit("classify", tmp_path / "rows.csv", rejects_path=tmp_path / "rejects.jsonl")
    assert env.scalar("SELECT count(*) FROM jobs") == 0


def test_skip_invalid_with_every_row_bad(env, client, tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(_jsonl({"id": 1}, {"id": 2}))
    with pytest.raises(InputError, match=r"rows.jsonl: no rows to submit \(2 rejected\)"):
        client.submit("classify", tmp_path / "rows.jsonl", rejects_path=tmp_path / "rejects.jsonl")
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 2
    assert env.scalar("SELECT count(*) FROM batches") == 0


def test_rejects_file_must_not_be_the_input(env, cli, tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(_jsonl(*GOOD))
    proc = cli("classify", "rows.jsonl", "--skip-invalid", "./rows.jsonl")
    assert_rejected_whole(env, proc, "--skip-invalid must not name the input file")
    assert (tmp_path / "rows.jsonl").read_bytes() == _jsonl(*GOOD)


def _peak_while_reading(path, fmt, config):
    snap = config.snapshot("classify")
    rejects = producer._Rejects(None)
    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            accepted = producer._Accepted(producer.read_rows(stream, fmt, path.name), snap, path.name, "id", rejects)
            count = sum(1 for _ in accepted)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_a_big_file_is_streamed(tmp_path):
    # Given a ~50 MB JSONL file and the same rows as CSV
    config = parse_config(yaml.safe_load(CONFIG.format(url="http://sim", tier2="large")), "t.yaml")
    text = "lorem ipsum " * 400
    jsonl, csv_path = tmp_path / "big.jsonl", tmp_path / "big.csv"
    with jsonl.open("w") as j, csv_path.open("w") as c:
        c.write("id,text\n")
        for i in range(10_000):
            j.write(json.dumps({"id": i, "text": text}) + "\n")
            c.write(f"{i},{text}\n")
    # When every row is read and checked
    for path, fmt in ((jsonl, "jsonl"), (csv_path, "csv")):
        count, peak = _peak_while_reading(path, fmt, config)
        # Then memory stays at a few rows, far below the file size
        assert count == 10_000
        assert path.stat().st_size > 45_000_000
        assert peak < 2_000_000, (path.name, peak)
