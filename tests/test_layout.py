"""The package shows its layers (issue 29): a small top level, every folder a package, no import cycle.

Read from the source with ast (no process, no import side effects), imports inside functions included:
an import deferred into a function to break a cycle is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "newllm"
TOP_LEVEL = {"__init__", "run", "analyze", "config", "errors", "metrics", "keys"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("newllm"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("newllm")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append([v, *comp])

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_newllm_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "c", "b"]]


def test_top_level_is_a_handful_of_modules_and_every_folder_is_a_package():
    assert {p.stem for p in PKG.glob("*.py")} <= TOP_LEVEL
    for folder in (p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        assert (folder / "__init__.py").exists(), folder


def test_analysis_never_imports_training():
    """analysis/ reads what runs leave on disk; training code is not needed to read results."""
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("newllm.analysis"):
            assert not {d for d in deps if d.startswith("newllm.training")}, name


def test_training_entry_points_are_annotated_with_the_typed_sections_run_hands_them():
    """run.py passes `typed(section, Schema)` (a dataclass instance, not a DictConfig): the cfg hint says so."""
    import typing

    import newllm.training.phase1
    import newllm.training.phase2

    tree = ast.parse((PKG / "run.py").read_text())
    handed = {}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
        for arg in call.args:
            if isinstance(arg, ast.Call) and getattr(arg.func, "id", None) == "typed":
                handed[call.func.id] = arg.args[1].id
    assert handed["train_phase1"] == "Phase1Config" and handed["train_phase2"] == "Phase2Config"
    for module, name in ((newllm.training.phase1, "train_phase1"), (newllm.training.phase2, "train_phase2")):
        assert typing.get_type_hints(getattr(module, name))["cfg"].__name__ == handed[name]
