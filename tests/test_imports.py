"""The package's import graph: no cycles (module-level and deferred imports alike, e.g. an op's
``__init__`` deferring ``from . import triton``), the layers flow one way (``ops`` never imports
the FastCLIP / module / model / optimizer layers; nothing imports ``training``), and every module
imports in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastclip_kernels"


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports, anywhere in the file}."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names
                ]
            else:
                continue
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


UPPER_LAYERS = (
    "fastclip_kernels.fastclip",
    "fastclip_kernels.nn",
    "fastclip_kernels.models",
    "fastclip_kernels.optim",
)


def test_layers_flow_one_way():
    graph = import_graph()
    for module, edges in graph.items():
        if module.startswith("fastclip_kernels.ops"):
            bad = [e for e in edges if e.startswith(UPPER_LAYERS)]
            assert not bad, f"{module} (an op) imports the layer above it: {bad}"
    text = "\n".join(path.read_text() for path in modules().values())
    assert "import training" not in text and "from training" not in text


def test_every_op_has_the_layout():
    ops = ROOT / PACKAGE / "ops"
    packages = (p for p in ops.iterdir() if (p / "__init__.py").exists() and p.name != "common")
    for folder in sorted(packages):
        files = {p.name for p in folder.glob("*.py")}
        assert {"__init__.py", "triton.py"} <= files, f"{folder.name}: {sorted(files)}"
        assert "naive.py" in files, f"{folder.name} has no naive.py (the <op>_ref spec)"
        assert (ROOT / "tests" / f"test_{folder.name}.py").exists(), f"no tests/test_{folder.name}.py"
        assert (ROOT / "benchmarks" / f"bench_{folder.name}.py").exists(), (
            f"no benchmarks/bench_{folder.name}.py"
        )


def test_every_module_imports_in_a_fresh_interpreter():
    """Any first import pulls in ``fastclip_kernels/__init__`` (hence every layer) first, so one fresh
    interpreter importing each module in turn covers import-time errors; cycles: the static check."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    proc = subprocess.run(
        [sys.executable, "-c", code, *sorted(modules())], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
