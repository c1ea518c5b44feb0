"""cascade: cheap LLM batch jobs without worse answers.

Every job goes to the cheapest model first; a validator decides whether the answer is good enough;
only failures are re-enqueued to bigger models. PostgreSQL records every attempt.
"""

from cascade.client import BatchStatus, Client
from cascade.config import CascadeConfig, CascadeSettings, load_config, load_settings
from cascade.errors import (
    CascadeError,
    ConfigError,
    IdempotencyConflict,
    InputError,
    ProviderError,
)
from cascade.producer import SubmitResult

__all__ = [
    "BatchStatus",
    "CascadeConfig",
    "CascadeError",
    "CascadeSettings",
    "Client",
    "ConfigError",
    "IdempotencyConflict",
    "InputError",
    "ProviderError",
    "SubmitResult",
    "load_config",
    "load_settings",
]
