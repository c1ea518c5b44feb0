"""Fixtures of the integration tests besides tests/conftest.py's services."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cascade.config import CascadeConfig
from tests.integration.inprocess import Run


@pytest.fixture
def run(env: Any) -> Iterator[Callable[..., Run]]:  # Any: tests.conftest.Env
    """Factory: ``run(config)`` runs a batch's stages in this process (``Run``), closed at teardown."""
    runs: list[Run] = []

    def make(cfg: CascadeConfig, **kw: Any) -> Run:  # Any: Run's options
        runs.append(Run(env, cfg, **kw))
        return runs[-1]

    yield make
    for r in runs:
        r.close()
