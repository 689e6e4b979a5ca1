"""Shared fixtures for the real-vLLM P/D tests.

Each test module starts its own ``Cluster`` (P + D + proxy) once. The connector under test is
``$KVBRIDGE_TEST_CONNECTOR`` ("kvbridge", the default, or "nixl" to check the tests' own logic
against vLLM's NixlConnector); assertions on ``kvbridge-xfer`` log lines only run for kvbridge.
Server logs go to ``<repo>/out/pytest/<module>/``. Nothing here skips: a missing piece fails.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

import pytest
from helpers import REPO  # noqa: F401  (also puts kvbridge and scripts/ on sys.path)
from make_model import make_model


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # pytest then runs fixture teardown, which stops the servers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts real vLLM servers (minutes); never skipped")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def connector() -> str:
    """The connector under test: $KVBRIDGE_TEST_CONNECTOR, default "kvbridge"."""
    name = os.environ.get("KVBRIDGE_TEST_CONNECTOR", "kvbridge")
    assert name in ("kvbridge", "nixl"), f"KVBRIDGE_TEST_CONNECTOR must be kvbridge or nixl, not {name!r}"
    return name


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The tiny Llama model, created once in $KVBRIDGE_CACHE/tiny-llama."""
    cache = Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge"))
    return make_model(cache / "tiny-llama")
