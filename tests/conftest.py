"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Moto, ServerProcess, require_tool, start_moto, start_server


@pytest.fixture(scope="session")
def terraform_bin() -> str:
    """The real terraform binary (skips, or fails under CI, when missing)."""
    return require_tool("terraform")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, terraform_bin: str
           ) -> Iterator[ServerProcess]:
    """A tfserver on the test modules with default limits, shared by a test module."""
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture()
def tmp(tmp_path: Path) -> Path:
    """A short alias of tmp_path."""
    return tmp_path


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    """moto's server (S3, DynamoDB, Cognito) on a free loopback port, for the session."""
    server = start_moto()
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)
