"""Shared pytest fixtures: a fixed torch seed per test and a `tmp` folder (run: .venv/bin/pytest tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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
