"""The shape of the code itself, read from its source with ``ast`` (nothing is imported or run):
no import cycle among the data modules, no private name borrowed from another module, and one
definition of each shared helper (the brief: one eval_transform, one ImageNet mean/std, one
_is_rank0, one CheckpointError)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_xcit"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """Every ``from ssl_xcit... import ...``, at the top or inside a function (a lazy import still
    ties the two modules together)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ssl_xcit")]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None
    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_data_modules_import_each_other_without_a_cycle():
    modules = _modules()
    data = {m for m in modules if m.startswith("ssl_xcit.data.")}
    graph = {m: {imp.module for imp in _imports(modules[m]) if imp.module in data and imp.module != m} for m in data}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_module_imports_another_ones_private_names():
    borrowed = [f"{m}: from {imp.module} import {a.name}" for m, tree in _modules().items() for imp in _imports(tree)
                for a in imp.names if a.name.startswith("_") and imp.module != m]
    assert borrowed == []


def _definitions(match) -> list[str]:
    """``module:name`` of every top-level function, class or assignment for which ``match(kind, name)``."""
    found = []
    for m, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                items = [(type(node).__name__, node.name)]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                items = [("Assign", t.id) for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            found += [f"{m}:{name}" for kind, name in items if match(kind, name)]
    return found


def test_one_definition_of_each_shared_helper():
    assert _definitions(lambda kind, name: kind == "FunctionDef" and name == "eval_transform") == [
        "ssl_xcit.evaluate.datasets:eval_transform"]
    for const in ("IMAGENET_MEAN", "IMAGENET_STD"):
        assert _definitions(lambda kind, name: kind == "Assign" and name == const) == [f"ssl_xcit.data.common:{const}"]
    assert _definitions(lambda kind, name: kind == "FunctionDef" and name.lstrip("_") == "is_rank0") == [
        "ssl_xcit.data.common:is_rank0"]
    assert _definitions(lambda kind, name: kind == "ClassDef" and name == "CheckpointError") == [
        "ssl_xcit.models.checkpoints:CheckpointError"]


def test_training_imports_nothing_of_the_cluster_launcher():
    """Imports point one way: the SLURM launcher (cluster/) runs training (train/, finetune/), never the
    reverse; the stop signals both need live in train/signals.py."""
    back = [f"{m}: from {imp.module}" for m, tree in _modules().items()
            if m.startswith(("ssl_xcit.train", "ssl_xcit.finetune")) for imp in _imports(tree)
            if imp.module.startswith("ssl_xcit.cluster")]
    assert back == []


def test_one_training_machinery():
    """Checkpointing, locking, logging and the stop flags each have one home, used by both loops."""
    for name, home in (("save_checkpoint", "ssl_xcit.engine.checkpoint"), ("RunLogger", "ssl_xcit.engine.logger"),
                       ("StopSignals", "ssl_xcit.engine.signals"), ("Run", "ssl_xcit.engine.run")):
        assert _definitions(lambda kind, n: kind in ("ClassDef", "FunctionDef") and n == name) == [f"{home}:{name}"]
    # the lock (shared with make_shards) and training's file name for it
    assert set(_definitions(lambda kind, n: kind == "ClassDef" and n == "OutputDirLock")) == {
        "ssl_xcit.locks:OutputDirLock", "ssl_xcit.engine.lock:OutputDirLock"}
    for loop in ("ssl_xcit.train.loop", "ssl_xcit.finetune.loop"):
        imported = {imp.module for imp in _imports(_modules()[loop])}
        assert "ssl_xcit.engine.run" in imported, loop
