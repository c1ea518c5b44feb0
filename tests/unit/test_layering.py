"""Layering: the core imports without Celery or kombu, never imports workers/, and exports an explicit __all__."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import cascade

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cascade"
#: The one core module allowed to import Celery or kombu, the broker libraries (STYLE §2 "Layers").
CELERY_MODULE = "cascade.publish"
BROKER_LIBRARIES = ("celery", "kombu")


def module_name(path: Path) -> str:
    """``cascade.stages.call`` for cascade/stages/call.py; a package is named by its ``__init__.py``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
CORE = [m for m in MODULES if m != CELERY_MODULE]

# Each module is imported from scratch (every cascade.* entry dropped from sys.modules first), so one
# module's failure does not hide or cause another's; the cascade frames of the traceback show the chain.
_PROBE = """
import importlib, json, sys, traceback
sys.path.insert(0, sys.argv[1])
sys.modules["celery"] = None
sys.modules["kombu"] = None
failures = {}
for name in json.loads(sys.argv[2]):
    for key in [k for k in sys.modules if k == "cascade" or k.startswith("cascade.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as exc:
        chain = [f.filename.rsplit("/", 2)[-2] + "/" + f.filename.rsplit("/", 1)[-1] + ":" + str(f.lineno)
                 for f in traceback.extract_tb(exc.__traceback__) if "/cascade/" in f.filename]
        failures[name] = type(exc).__name__ + ": " + str(exc) + " via " + " -> ".join(chain)
print(json.dumps(failures))
"""


@pytest.fixture(scope="module")
def import_failures_without_celery() -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT), json.dumps(CORE)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    failures: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return failures


@pytest.mark.parametrize("name", CORE)
def test_core_imports_without_celery(import_failures_without_celery: dict[str, str], name: str) -> None:
    # Given a Python where `import celery` and `import kombu` fail (sys.modules[...] = None)
    # When a core module (anything but cascade.publish) is imported on its own
    # Then it imports: the core must run under a CLI, a test or another queue
    failure = import_failures_without_celery.get(name)
    if failure is not None:
        pytest.fail(f"{name} cannot be imported without celery and kombu: {failure}", pytrace=False)


def test_every_module_is_probed() -> None:
    # Given the package directory
    # When its modules are listed
    # Then the probe covers the package itself and every module but publish
    assert "cascade" in CORE
    assert {"cascade.config", "cascade.policy", "cascade.validate", "cascade.stages"} <= set(CORE)
    assert CELERY_MODULE in MODULES and CELERY_MODULE not in CORE


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("name", MODULES)
def test_no_core_module_imports_workers(name: str) -> None:
    # Given a module of cascade/
    path = module_path(name)

    # When its imports are read (anywhere in the file, not only at the top)
    imported = _top_level(_imported_modules(path))

    # Then workers/ is not among them: imports go workers/ -> cascade/, never back
    assert "workers" not in imported


@pytest.mark.parametrize(
    ("name", "library"),
    [(name, library) for name in CORE for library in BROKER_LIBRARIES],
)
def test_only_publish_imports_the_broker_libraries(name: str, library: str) -> None:
    # Given a core module other than cascade.publish
    path = module_path(name)

    # When its imports are read
    imported = _top_level(_imported_modules(path))

    # Then neither celery nor kombu is among them
    assert library not in imported


def test_all_is_the_sorted_public_names() -> None:
    # Given the cascade package (httpx's tests/test_exported_members.py)
    # When its public names are listed (submodules are attributes too, but not exports)
    public = sorted(
        name for name, value in vars(cascade).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    )

    # Then __all__ is exactly those names, sorted
    assert cascade.__all__ == public


def test_all_names_resolve() -> None:
    # Given cascade.__all__
    # When each name is looked up
    # Then it exists and is not None
    assert all(getattr(cascade, name, None) is not None for name in cascade.__all__)
