"""What a stage's cache key holds (flows/cache_key.py): execution-only fields are left out, any other field is in, and
the code version ignores comments, docstrings and formatting but not a changed statement.
Run: .venv/bin/pytest tests/test_cache_key.py"""

from __future__ import annotations

from pathlib import Path

from flows.cache_key import cache_key, execution_fields, source_version
from flows.config import load_config


def _key(stage: str, *overrides: str) -> str:
    cfg = load_config(None, list(overrides))
    return cache_key(stage, getattr(cfg, stage), {"corpus": "abc"}, "code", {})


def test_execution_only_fields_reuse_and_any_other_field_reruns() -> None:
    assert {"workers", "dask_address"} <= execution_fields("ingest")
    base = _key("ingest")
    assert _key("ingest", "ingest.workers=2") == base
    assert _key("ingest", "ingest.dask_address=tcp://127.0.0.1:8786") == base
    assert _key("ingest", "ingest.min_chars=5") != base
    assert _key("ingest", "ingest.val_fraction=0.05") != base
    assert execution_fields("sft") == frozenset() and _key("sft", "sft.seed=1") != _key("sft")


def test_a_comment_docstring_or_formatting_edit_keeps_the_code_version(tmp_path: Path) -> None:
    def version(src: str) -> str:
        path = tmp_path / f"m{abs(hash(src))}.py"
        path.write_text(src)
        return source_version(str(path))

    original = '"""Doc."""\n\ndef f(x):\n    """Adds one."""\n    return x + 1  # why\n'
    same = [
        '"""Another module doc."""\n\ndef f(x):\n    """Adds one, said otherwise."""\n    return x + 1\n',
        '\n\ndef f( x ):\n    # a new comment\n    return (x\n            + 1)\n',
    ]
    assert all(version(s) == version(original) for s in same)
    assert version('def f(x):\n    return x + 2\n') != version(original)
    assert version('def f(x):\n    """Adds one."""\n    y = 1\n    return x + y\n') != version(original)


def test_every_field_of_every_stage_is_in_the_key_unless_declared_execution_only() -> None:
    import warnings

    from flows.config import PipelineConfig
    from flows.specs import STAGES

    cfg = load_config(None, [])
    assert isinstance(cfg, PipelineConfig)
    for spec in STAGES:
        section = getattr(cfg, spec.name)
        declared = execution_fields(spec.name)
        base = cache_key(spec.name, section, {}, "code", {})
        for name in type(section).model_fields:
            changed = section.model_copy(update={name: f"changed-{name}"})  # unvalidated: any value differs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydantic warns that the value is not of the field's type
                key = cache_key(spec.name, changed, {}, "code", {})
            assert (key == base) == (name in declared), f"{spec.name}.{name}"
