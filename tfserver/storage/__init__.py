"""Where state, inputs, records, events, plans and keys live: the interfaces (`base`), the
local folder (`local`) and S3 (`s3`). boto3 is imported only when S3 is used."""

from __future__ import annotations

from ..config import Config, S3Settings
from .base import StateBackend


def make_backend(config: Config) -> StateBackend:
    """The backend the configuration names."""
    if isinstance(config.backend, S3Settings):
        from .s3 import S3Backend

        return S3Backend(config.backend)
    from .local import LocalBackend

    return LocalBackend(config.state_dir)
