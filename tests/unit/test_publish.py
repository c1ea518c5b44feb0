"""Grouping due jobs into task messages (cascade.publish.messages)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cascade.publish import messages
from cascade.store import Stage


def test_dues_are_grouped_per_tier_and_stage_in_order() -> None:
    # Given dues of two (tier, stage)s, interleaved
    due = [(1, 1, Stage.CALL), (2, 1, Stage.VALIDATE), (3, 1, Stage.CALL), (4, 1, Stage.CALL), (5, 2, Stage.CALL),
           (6, 1, Stage.CALL)]

    # When they are grouped two ids per message
    got = messages(due, 2)

    # Then each message holds ids of one (tier, stage), in the order they were due, at most two
    assert got == [([1, 3], 1, Stage.CALL), ([2], 1, Stage.VALIDATE), ([4, 6], 1, Stage.CALL), ([5], 2, Stage.CALL)]


@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 3), st.sampled_from(list(Stage))), max_size=200),
       st.integers(1, 20))
def test_every_due_is_in_exactly_one_message_of_its_kind(due: list[tuple[int, int, Stage]], size: int) -> None:
    got = messages(due, size)
    # Every due appears once, under its own tier and stage, and no message is empty or over size
    assert sorted((i, t, s) for ids, t, s in got for i in ids) == sorted(due)
    assert all(1 <= len(ids) <= size for ids, _, _ in got)
    # And there are as few messages as the size allows for each kind
    for tier, stage in {(t, s) for _, t, s in due}:
        count = sum(1 for _, t, s in due if (t, s) == (tier, stage))
        assert sum(1 for _, t, s in got if (t, s) == (tier, stage)) == -(-count // size)
