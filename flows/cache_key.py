"""The cache key of a stage run: its config, the content hashes of its inputs, the fingerprints of the files and
datasets its config points at (flows.external), and the version of its code.

The code version covers the stage's module, every project module it imports (found statically, transitively) and
the versions of the libraries that compute the result, so editing another stage's module reuses this one's runs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from pydantic import BaseModel

from flows.specs import StageSpec

_OWN_PACKAGES = ("stages", "llm")
_LIBS = ("torch", "transformers", "trl", "peft", "tokenizers", "datasets", "pyarrow")


@cache
def _imports_of(path: str, modname: str) -> tuple[str, ...]:
    """Project modules (`stages.*`, `llm.*`) a source file imports, found statically (no import side effects)."""
    tree = ast.parse(Path(path).read_text(), filename=path)
    pkg = modname if path.endswith("__init__.py") else modname.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in _OWN_PACKAGES:
                found.add(n)
    return tuple(sorted(found))


def _source_closure(modname: str) -> dict[str, str]:
    """Module name -> source file for a module and every project module it (transitively) imports."""
    seen: dict[str, str] = {}
    todo = [modname]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py"):
            if name not in (modname,) and "." in name:
                seen[name] = ""  # `from pkg import name` where name is not a module
            continue
        seen[name] = origin
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a.b runs a/__init__.py first
        todo.extend(_imports_of(origin, name))
    return {k: v for k, v in seen.items() if v}


def _drop_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def source_version(path: str) -> str:
    """sha256 of what a source file computes: its syntax tree without docstrings, positions or comments (which the
    parser drops), so a comment, docstring or formatting edit keeps the version and a changed statement does not."""
    tree = _drop_docstrings(ast.parse(Path(path).read_text(), filename=path))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def code_version(spec: StageSpec) -> str:
    """Hash of the code a stage's result depends on: its module, the project modules it imports (transitively),
    and the versions of the libraries that compute it. Editing another stage's module does not change it, nor
    does a comment, docstring or formatting edit (`source_version`)."""
    files = _source_closure(spec.module)
    if not files:  # a module without a source file (built in memory, e.g. in tests): its name stands in
        files = {spec.module: ""}
    h = hashlib.sha256()
    for name, path in sorted(files.items()):
        h.update(name.encode() + b"\0")
        if path:
            h.update(bytes.fromhex(source_version(path)))
    for lib in _LIBS:
        try:
            h.update(f"{lib}=={importlib.metadata.version(lib)};".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def execution_fields(stage: str) -> frozenset[str]:
    """The config fields a stage declares execution-only (`EXECUTION_FIELDS` in its module: how the work is spread,
    never what it computes; each is tested to give byte-identical outputs), left out of its cache key."""
    from flows.specs import STAGES

    spec = next((s for s in STAGES if s.name == stage), None)
    if spec is None:
        return frozenset()
    try:
        return frozenset(getattr(spec.load(), "EXECUTION_FIELDS", ()))
    except ImportError:
        return frozenset()


def cache_key(stage: str, cfg: BaseModel, input_hashes: Mapping[str, str], code: str,
              external: Mapping[str, str] | None = None) -> str:
    """`external`: fingerprints of the files and datasets the config points at (flows.external). The stage's
    execution-only fields are left out: changing them reuses a finished run."""
    config = cfg.model_dump(mode="json", exclude=set(execution_fields(stage)) or None)
    blob = json.dumps(
        {"stage": stage, "config": config, "inputs": dict(input_hashes), "code": code,
         "external": dict(external or {})},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
