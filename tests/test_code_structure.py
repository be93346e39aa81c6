"""The shape of the code itself, read from its source with ``ast`` (nothing is imported or run):
no import cycle among the data modules, no private name borrowed from another module, and one
definition of each shared helper (the brief: one eval_transform, one ImageNet mean/std, one
_is_rank0, one CheckpointError), and the layers of issue 32: the engine under both training loops,
which never import each other, and the command layer (parsers, flags) above a library that takes
Python parameters. No function over 60 lines."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_xcit"


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, ast.Module]:
    """Every module of the package, parsed once per session (read-only)."""
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
        "ssl_xcit.ranks:is_rank0"]
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


# ---------------------------------------------------------------- the layers (issue 32)
# The command layer: argument parsers, flag names, main(argv) of the commands. Everything else under
# ssl_xcit/ is the library, which takes Python parameters.
COMMAND_LAYER = ("ssl_xcit.commands", "ssl_xcit.cli", "ssl_xcit.console")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _arrows(src, dst: tuple[str, ...]) -> list[str]:
    """``module: from target`` for every import from a module of ``src`` (packages, or a test of the
    module's name) into one of ``dst``."""
    inside = src if callable(src) else (lambda m: _in(m, src))
    return [f"{m}: from {imp.module} import {a.name}" for m, tree in _modules().items() if inside(m)
            for imp in _imports(tree) for a in imp.names
            if _in(imp.module, dst) or _in(f"{imp.module}.{a.name}", dst)]   # from ssl_xcit import cli


def test_train_and_finetune_meet_only_in_the_engine():
    """DINO (train/) and fine-tuning (finetune/) are siblings on the engine: neither imports the other."""
    assert _arrows(("ssl_xcit.train",), ("ssl_xcit.finetune",)) == []
    assert _arrows(("ssl_xcit.finetune",), ("ssl_xcit.train",)) == []


def test_the_engine_stands_below_the_loops_and_the_commands():
    engine = {"ssl_xcit.engine.run", "ssl_xcit.engine.checkpoint", "ssl_xcit.engine.config", "ssl_xcit.engine.build",
              "ssl_xcit.engine.step", "ssl_xcit.engine.signals", "ssl_xcit.engine.launch"}
    assert engine <= set(_modules()), sorted(engine - set(_modules()))
    assert _arrows(("ssl_xcit.engine",), ("ssl_xcit.train", "ssl_xcit.finetune", "ssl_xcit.cluster") + COMMAND_LAYER) == []


def _is_command(module: str) -> bool:
    """The command layer, and a package's ``__main__`` (``python -m ssl_xcit.publish``): a command line."""
    return _in(module, COMMAND_LAYER) or module.endswith(".__main__")


def _main_guarded(tree: ast.Module) -> set[int]:
    """The ids of the nodes under a module's ``if __name__ == "__main__":``: the module's ``python -m``
    entry, which hands over to the command layer (``python -m ssl_xcit.data.make_shards``)."""
    guards = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) in (
        "__name__ == '__main__'", "'__main__' == __name__")]
    return {id(inner) for g in guards for stmt in g.body for inner in ast.walk(stmt)}


def test_the_library_never_imports_the_command_layer():
    """Parsers, flags and main(argv) are the command layer's; the library takes Python parameters (a
    command module reads its command line into them: ssl_xcit/commands/knn.py over evaluate/knn.py)."""
    modules = _modules()
    arrows = [f"{m}: from {imp.module} import {a.name}" for m, tree in modules.items() if not _is_command(m)
              for imp in _imports(tree) if id(imp) not in _main_guarded(tree) for a in imp.names
              if _in(imp.module, COMMAND_LAYER) or _in(f"{imp.module}.{a.name}", COMMAND_LAYER)]
    assert arrows == []


def test_a_main_guard_or_a_main_module_only_hands_over_to_a_command():
    """All that may sit in a ``__main__.py`` or under a library module's ``if __name__ == "__main__":``:
    an import from the command layer's package and one call (no parser, no flag of its own)."""
    for m, tree in _modules().items():
        if m.endswith(".__main__"):
            entry = {id(n) for n in ast.walk(tree)}
        elif not _is_command(m):
            entry = _main_guarded(tree)
        else:
            continue
        calls = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and id(n) in entry]
        assert len(calls) <= 1, (m, calls)
        imported = [imp.module for imp in _imports(tree) if id(imp) in entry]
        assert all(_in(i, ("ssl_xcit.commands",)) for i in imported), (m, imported)


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def _code_strings(tree: ast.Module) -> list[ast.Constant]:
    """The string constants of a module that are not docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_no_flag_text_in_library_code():
    """Flags are the command layer's words: a library module says what a Python caller passes
    (errors a setting can fix: ssl_xcit.errors.hinted, which the command layer words as its flag)."""
    found = {m: sorted({f.group(0) for c in _code_strings(tree) for f in _FLAG.finditer(c.value)})
             for m, tree in _modules().items() if not _is_command(m)}
    assert {m: flags for m, flags in found.items() if flags} == {}


def _functions() -> list[tuple[str, ast.FunctionDef]]:
    return [(m, node) for m, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_one_definition_of_each_step_both_loops_take():
    """What DINO and fine-tuning both do has one home, in the engine or below it (the twins issue 32 merged)."""
    homes = {"configured_steps": "ssl_xcit.engine.build", "seed_this_rank": "ssl_xcit.engine.build",
             "training_sampler": "ssl_xcit.engine.build", "training_loader": "ssl_xcit.engine.build",
             "place_models": "ssl_xcit.engine.build", "make_scaler": "ssl_xcit.engine.step",
             "backward_and_step": "ssl_xcit.engine.step", "autocast_context": "ssl_xcit.engine.step",
             "apply_schedules": "ssl_xcit.engine.step", "state_dict_mismatch": "ssl_xcit.engine.checkpoint",
             "require_parts": "ssl_xcit.engine.checkpoint", "need": "ssl_xcit.engine.config",
             "load_config": "ssl_xcit.engine.config", "run_training": "ssl_xcit.engine.launch",
             "data_facts": "ssl_xcit.engine.recipe", "set_unset": "ssl_xcit.engine.recipe",
             "file_sha256": "ssl_xcit.atomic", "check_positive": "ssl_xcit.evaluate.inputs",
             "pick_device": "ssl_xcit.distributed", "pretrained_start": "ssl_xcit.engine.run",
             "is_main": "ssl_xcit.distributed", "train_transform": "ssl_xcit.finetune.data"}
    defined: dict[str, list[str]] = {}
    for m, fn in _functions():
        if fn.name in homes:
            defined.setdefault(fn.name, []).append(m)
    assert {name: defined.get(name) for name in homes} == {name: [home] for name, home in homes.items()}
    for const in ("MAX_EPOCHS", "AUTO_MAX_IMAGES"):
        assert len(_definitions(lambda kind, name: kind == "Assign" and name == const)) == 1, const
    assert _definitions(lambda kind, name: kind == "ClassDef" and name == "EvalInputError") == [
        "ssl_xcit.evaluate.inputs:EvalInputError"]


def test_the_loops_leave_seeds_scalers_and_bounds_to_the_engine():
    """No loop seeds its ranks, builds a GradScaler or spells the epoch bound itself."""
    loops = ("ssl_xcit.train", "ssl_xcit.finetune")
    calls = [f"{m}:{ast.unparse(n.func)}" for m, tree in _modules().items() if _in(m, loops) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(("manual_seed", "random.seed", "GradScaler"))]
    assert calls == []
    bounds = [m for m, tree in _modules().items() if _in(m, loops) for n in ast.walk(tree)
              if isinstance(n, ast.Constant) and n.value == 10_000]
    assert bounds == []
    timm_stats = [m for m, tree in _modules().items() for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and n.module == "timm.data" and any("IMAGENET_DEFAULT" in a.name for a in n.names)]
    assert timm_stats == [], "ImageNet mean/std: ssl_xcit.data.common's"


def test_no_function_is_longer_than_60_lines():
    long = [f"{m}:{fn.name} ({fn.end_lineno - fn.lineno + 1})" for m, fn in _functions()
            if fn.end_lineno - fn.lineno + 1 > 60]
    assert long == []


def test_dinos_loop_reads_in_under_120_lines():
    """train/loop.py is DINO's method read top to bottom: its functions together stay short (the time
    budget's re-planning is the budget's, the run's bookkeeping the engine's)."""
    tree = _modules()["ssl_xcit.train.loop"]
    lines = sum(n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, ast.FunctionDef))
    assert lines <= 120, lines


def test_collaborators_are_passed_in_not_attached_from_outside():
    """A run's checkpoint extras and a logger are given where the object is made (or through a method
    named for the wiring, ``Run.wire_checkpoint_extras``), never set on another object's attribute
    (``run.checkpoint_extras = ...``, ``monitor.logger = run.logger``: issue 32)."""
    attached = [f"{m}:{n.lineno} {ast.unparse(t)}" for m, tree in _modules().items() for n in ast.walk(tree)
                if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and t.attr.lstrip("_") in ("checkpoint_extras", "logger")
                and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))]
    assert attached == []
