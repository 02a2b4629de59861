"""The codebase's shape rules (docs/ARCHITECTURE.md): small files and functions, no module shadowing another, no
import-path surgery, and each layer importing only the layers below it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm", "stages", "flows", "bench")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# argparse set-up reads best as one list of options; the rule exempts the CLI's parser builders only
PARSER_BUILDERS = {("flows/cli.py", "build_parser"), ("llm/cli.py", "build_parser")}
# which project packages each layer may import (the layer order of docs/ARCHITECTURE.md)
MAY_IMPORT = {"llm": {"llm"}, "stages": {"llm", "stages"}, "flows": {"llm", "stages", "flows"},
              "bench": {"llm", "stages", "flows", "bench"}}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_no_file_over_the_line_limit():
    long = {_rel(p): n for p in [*_sources(), *(ROOT / "tests").glob("*.py")]
            if (n := p.read_text().count("\n")) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by job): {long}"


def test_no_function_over_the_line_limit():
    long = []
    for p in [*_sources(), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (_rel(p), node.name) not in PARSER_BUILDERS:
                    long.append(f"{_rel(p)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_shadows_the_standard_library_or_a_project_package():
    clashes = []
    for p in _sources():
        name = p.stem if p.name != "__init__.py" else None
        if name and (name in sys.stdlib_module_names or name in PACKAGES or name in ("tests",)):
            clashes.append(_rel(p))
    assert not clashes, f"modules named like a standard-library module or a project package: {clashes}"


def test_no_import_path_surgery_outside_tests():
    found = [f"{_rel(p)}:{i}" for p in _sources() for i, line in enumerate(p.read_text().splitlines(), 1)
             if "sys.path" in line or "sys.modules" in line]
    assert not found, f"sys.path / sys.modules edits (import by package name instead): {found}"


def test_layers_import_only_downwards():
    bad = []
    for p in _sources():
        layer = p.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top not in MAY_IMPORT[layer]:
                    bad.append(f"{_rel(p)}:{node.lineno} imports {name}")
    assert not bad, f"imports against the layer order: {bad}"


def test_no_module_level_getattr_hides_a_definition():
    hidden = [_rel(p) for p in _sources()
              if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert not hidden, f"module-level __getattr__ (define the names explicitly so a search finds them): {hidden}"


def _imported(p: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module and `from` name a source file imports (relative imports resolved)."""
    pkg = ".".join(p.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_stages_folder_holds_the_stages_and_their_shared_interface_only():
    from flows.specs import STAGES

    stage_modules = {s.module.removeprefix("stages.") for s in STAGES}
    top = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__", "common"}
    assert top == stage_modules, f"modules in stages/ that are not a stage (move them to a subpackage): " \
                                 f"{sorted(top - stage_modules)}; stages without a module: {sorted(stage_modules - top)}"


def test_only_the_flow_layer_decides_reuse():
    """Stages resume their own checkpoints; whether a stage computes at all is decided by flows.stage_runner alone
    (with flows.finished, the record it writes beside the outputs)."""
    words = ("reuse", "finished")
    in_stages = [f"{_rel(p)}:{line} imports {name}" for p in (ROOT / "stages").rglob("*.py")
                 for line, name in _imported(p) if any(w in name.split(".")[-1] for w in words)]
    assert not in_stages, f"a stage imports a reuse helper: {in_stages}"
    users = {_rel(p) for p in _sources() for _, name in _imported(p) if name.startswith("flows.finished")}
    assert users == {"flows/stage_runner.py"}, users


def test_only_the_task_data_layer_imports_the_built_in_world():
    allowed = {"stages/data/builtin.py"}
    bad = [f"{_rel(p)}:{line} imports {name}" for p in _sources() for line, name in _imported(p)
           if name.startswith("stages.world") and _rel(p) not in allowed and not _rel(p).startswith("stages/world/")]
    assert not bad, f"the built-in world is reached through stages.data.builtin / stages.data.task_data only: {bad}"
