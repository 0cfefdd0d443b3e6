"""The package's layout rules (docs/architecture.md): no import cycles, no import that
runs against the data flow, and a report that never loads the network's libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brainage_xai"

#: Which packages a package may not import, and why (docs/architecture.md, "Rules").
FORBIDDEN = {
    "decomposition": ({"bids", "imaging", "model", "selection", "explain", "report", "workflows",
                       "cli", "simulate"}, "pure numerics: knows no files and no network"),
    "selection": ({"model", "explain", "report", "workflows", "cli", "simulate"},
                  "numerics on tensors; the network's head comes in as a function"),
    "explain": ({"report", "workflows", "cli"}, "computes explanations; writes and renders nothing"),
    "report": ({"model", "explain", "selection", "decomposition", "workflows", "cli", "simulate"},
               "reads the files of group/ and renders them; no torch"),
    "imaging": ({"model", "explain", "selection", "report", "workflows", "cli"}, "images only"),
    "bids": ({"model", "explain", "selection", "imaging", "workflows", "cli", "simulate"},
             "the dataset and the output names"),
    "model": ({"explain", "selection", "report", "workflows", "cli"}, "the network and its passes"),
    "simulate": ({"model", "explain", "selection", "report", "workflows", "cli"}, "the cohort only"),
    "utils": ({"bids", "imaging", "model", "explain", "selection", "report", "workflows", "cli",
               "simulate", "decomposition"}, "helpers below everything"),
    "workflows": ({"cli"}, "the levels; the command line wires them"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``brainage_xai`` module that ``path`` imports, at the top or in a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "brainage_xai"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "brainage_xai":
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` imports the module x
                if (PACKAGE.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(".py").is_file():
                    found.add(f"{target}.{alias.name}")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {t for t in _imports(path) if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _between_packages(graph):
    """The graph without a package's own ``__init__`` re-exporting its submodules."""
    return {v: {w for w in ws if not (v + ".").startswith(w + ".") and not w.startswith(v + ".")}
            for v, ws in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_between_packages(_graph()))
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_data_flow(package):
    forbidden, why = FORBIDDEN[package]
    bad = []
    for source, targets in _graph().items():
        if source.split(".")[1:2] != [package]:
            continue
        for target in targets:
            if target.split(".")[1:2] and target.split(".")[1] in forbidden:
                bad.append(f"{source} -> {target}")
    assert not bad, f"brainage_xai.{package} ({why}) imports: {bad}"


def test_the_report_does_not_load_torch():
    code = ("import sys, brainage_xai.report, brainage_xai.report.group, brainage_xai.report.figures, "
            "brainage_xai.report.subject, brainage_xai.report.methods; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('brainage_xai.model')"
            " or m.startswith('brainage_xai.explain')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_is_a_grab_bag():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, f"modules over 600 lines: {long}"
