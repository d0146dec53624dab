"""The package's imports point one way along the pipeline, function-level imports included (they hide cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import slmkit

ROOT = Path(slmkit.__file__).parent

# Lowest first: a module may import only from its own unit or a unit listed before it. The order is the pipeline's
# (data → tokenizer → model → train → compress → eval → export/serve), with the storage and runtime layers each stage
# needs placed below the stages: the C kernels (decoding, and the training loss) sit with the runtime; a checkpoint is
# written by train, so it sits under train; the quantized linears are what compress produces modules for, and eval
# measures decoding through the engine, so infer sits under both. interop (import/export of other formats) sits under
# api, so `LLM.export` can call it.
LAYERS = (
    ("errors",), ("fsutil", "versions"), ("runtime", "kernels"), ("config",), ("run",), ("metrics", "sampling"),
    ("tokenizer",), ("data",), ("model",), ("checkpoint",), ("train",), ("infer",), ("compress",), ("finetune",),
    ("distill",), ("interop",), ("api",), ("eval",), ("recipes",), ("serve",), ("cli", "__main__", "__init__"),
)
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every slmkit module `path` imports, at any depth of the file (module level, functions, methods)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("slmkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slmkit") and node.level == 0:
            for a in node.names:  # `from slmkit import checkpoint` imports a module, not a name of slmkit/__init__
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (ROOT.parent / sub.replace(".", "/")).is_dir()
                out.add(sub if is_module else node.module)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in graph()}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS"


def test_imports_point_one_way():
    wrong = [f"{m} imports {d}" for m, deps in sorted(graph().items()) for d in sorted(deps)
             if unit_of(d) != unit_of(m) and RANK[unit_of(d)] > RANK[unit_of(m)]]
    assert not wrong, "imports against the pipeline:\n" + "\n".join(wrong)


def test_no_import_cycles_inside_a_unit():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in g.get(m, ()):
            if d == m or unit_of(d) != unit_of(m) or d not in g:
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " → ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from slmkit.eval.lm import Scorer\n    import slmkit.train\n")
    assert imports_of(f) == {"slmkit.eval.lm", "slmkit.train"}


@pytest.mark.slow
def test_importing_the_trainer_does_not_load_the_kernels_or_heavy_extras():
    code = ("import sys, slmkit.train, slmkit.data, slmkit.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith(('slmkit.infer', 'slmkit.eval', 'transformers', "
            "'fastapi', 'onnx'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
