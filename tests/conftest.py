"""Shared pytest fixtures: a fixed torch seed per test and a `tmp` folder (run: .venv/bin/pytest tests)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

# A shell runs a background job (`make test &`, a CI step started with `&`) with SIGINT ignored, and every process
# started from it inherits that: the servers the tests start would then ignore the Ctrl-C the tests send them. A
# Python-level handler here is reset to the default in each child at exec, so Ctrl-C works there as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for modules of tiny-model tests: as fast on 2 idle cores, and far faster than two
    spinning OpenMP threads when the CPU is shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
