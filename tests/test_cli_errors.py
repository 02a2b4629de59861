"""Errors a user fixes (bad config, bad data, unknown run or model), through the real command line: a non-zero exit,
the one-line message that names the problem, and no traceback, neither from the CLI nor from Prefect's run logs;
`--debug` brings the traceback back. Run: .venv/bin/pytest tests/test_cli_errors.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each case starts the CLI and a temporary Prefect server


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _config(tmp: Path, sources: list[dict] | None = None) -> str:
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    if sources is not None:
        cfg["ingest"]["sources"] = sources
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _fails_cleanly(r: subprocess.CompletedProcess[str], *expected: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    for text in expected:
        assert text in r.stderr, f"{text!r} not in:\n{r.stderr[-3000:]}"
    assert "Traceback" not in out, out[-5000:]


def _files(tmp: Path, name: str) -> list[dict]:
    return [{"type": "files", "paths": [str(tmp / name)]}]


def test_a_source_whose_format_cannot_be_told(tmp_path):
    (tmp_path / "notes.xyz").write_text("Some text that is long enough to keep as a document.\n")
    r = _cli(tmp_path, "stage", "ingest", "--config", _config(tmp_path, _files(tmp_path, "notes.xyz")))
    _fails_cleanly(r, "cannot tell the format from the extension '.xyz'; set format in the source")


def test_a_parquet_file_without_the_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["a document long enough to keep"] * 3}), tmp_path / "docs.parquet")
    r = _cli(tmp_path, "stage", "ingest", "--config", _config(tmp_path, _files(tmp_path, "docs.parquet")))
    _fails_cleanly(r, "Parquet file has no column 'text'", "set text_field")


def test_an_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    r = _cli(tmp_path, "stage", "ingest", "--config", _config(tmp_path, _files(tmp_path, "empty.txt")))
    _fails_cleanly(r, "the corpus is empty")


def test_an_unknown_from_run_id_and_debug_keeps_the_traceback(tmp_path):
    config = _config(tmp_path)
    r = _cli(tmp_path, "stage", "sft", "--config", config, "--from-run", "0123456789abcdef0123456789abcdef")
    _fails_cleanly(r, "0123456789abcdef0123456789abcdef")
    r = _cli(tmp_path, "--debug", "stage", "sft", "--config", config, "--from-run", "0123456789abcdef0123456789abcdef")
    assert r.returncode != 0 and "Traceback" in r.stdout + r.stderr


def test_generate_with_a_model_that_does_not_exist(tmp_path):
    r = _cli(tmp_path, "generate", "--model", "no/such/folder", "--prompt", "Once upon")
    _fails_cleanly(r, "no folder", "models:/NAME", "not an MLflow run id")
