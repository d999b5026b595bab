"""The architecture rules of README/docs/architecture.md, checked on the source text (ast; no
import, no Ray, about a second):

- no import circle among the modules of ``avar_ray/``, ``actors/`` and ``rewards/``
  (module-level and function-level imports alike; ``if TYPE_CHECKING:`` blocks never run);
- imports flow one way: rewards and pure maths <- actors <- drivers <- commands;
- one vLLM ``LLM(`` construction site, one DeepSpeed config builder;
- no ``*Spec`` dataclass that repeats a default of config.py.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("avar_ray", "actors", "rewards")
# rewards may import only these modules of ours: pure maths (torch/numpy, no model, no Ray)
PURE_MATHS = ("avar_ray.grpo", "avar_ray.spans")
DRIVERS = ("avar_ray.rl", "avar_ray.sft", "avar_ray.synth", "avar_ray.eval")
COMMANDS = ("avar_ray.commands", "avar_ray.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement that can run: at module level or inside functions and classes."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _nearest_module(name: str, known) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, tree) in mods.items():
        edges: dict[str, int] = {}
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, path, node)
                # ``from pkg import submodule`` imports the submodule; ``from mod import obj`` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                hit = _nearest_module(target, mods)
                if hit and hit != name:
                    edges.setdefault(hit, node.lineno)
        graph[name] = edges
    return graph


def _where(src: str, dst: str) -> str:
    path = _modules()[src][0].relative_to(ROOT)
    return f"{path}:{import_graph()[src][dst]}"


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle path per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:
        start = min(scc)
        # breadth-first back to the start inside the component: the shortest circle through it
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in scc and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(list(reversed(path)) + [start])
    return cycles


def test_find_cycles_reports_the_circle():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_function_level_imports_count_and_type_checking_ones_do_not():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
                     "def f():\n    from c import d\n"
                     "class K:\n    def g(self):\n        import e.f\n")
    seen = [alias.name if isinstance(n, ast.Import) else n.module for n in _import_nodes(tree) for alias in n.names]
    assert seen == ["typing", "b", "c", "e.f"]


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50, "the module walk found too few modules"
    msgs = [" -> ".join(f"{a} ({_where(a, b)})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}"
            for c in find_cycles(graph)]
    assert not msgs, "import cycles:\n" + "\n".join(msgs)


def _violations(importers, forbidden) -> list[str]:
    return [f"{_where(src, dst)}: {src} imports {dst}"
            for src, edges in sorted(import_graph().items()) if importers(src)
            for dst in sorted(edges) if forbidden(dst)]


def test_rewards_import_only_pure_maths():
    bad = _violations(lambda m: _under(m, ["rewards"]),
                      lambda m: not _under(m, ["rewards", *PURE_MATHS]))
    assert not bad, "rewards/ imports more than pure maths:\n" + "\n".join(bad)


def test_actors_import_no_driver():
    bad = _violations(lambda m: _under(m, ["actors"]), lambda m: _under(m, DRIVERS + COMMANDS))
    assert not bad, "actors/ import driver packages:\n" + "\n".join(bad)


def test_drivers_import_no_commands():
    bad = _violations(lambda m: _under(m, DRIVERS), lambda m: _under(m, COMMANDS))
    assert not bad, "drivers import commands:\n" + "\n".join(bad)


def _production_files():
    """Everything that ships or runs outside tests: the packages and bench/."""
    for name, (path, tree) in _modules().items():
        yield path, tree
    for path in sorted((ROOT / "bench").rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def test_one_llm_construction_site():
    sites = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path, tree in _production_files() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and (
                 (isinstance(node.func, ast.Name) and node.func.id == "LLM")
                 or (isinstance(node.func, ast.Attribute) and node.func.attr == "LLM"))]
    assert [s.rpartition(":")[0] for s in sites] == ["avar_ray/engines.py"], \
        f"vLLM LLM( constructions outside tests (want one, in avar_ray/engines.py): {sites}"


def test_one_deepspeed_config_builder():
    builders = sorted({str(path.relative_to(ROOT)) for name, (path, tree) in _modules().items()
                       for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and node.value == "zero_optimization"})
    assert len(builders) == 1, f"modules that build a DeepSpeed config (want one): {builders}"


def _dataclasses(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "dataclass")
                or (isinstance(d, ast.Call) and getattr(d.func, "id", getattr(d.func, "attr", "")) == "dataclass")
                or (isinstance(d, ast.Attribute) and d.attr == "dataclass")
                for d in node.decorator_list):
            yield node


def _field_defaults(cls: ast.ClassDef):
    """(field name, ast.dump of its default, line) for each field with a default."""
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            yield stmt.target.id, ast.dump(stmt.value), stmt.lineno


def test_no_spec_class_repeats_config_defaults():
    config_path, config_tree = _modules()["avar_ray.config"]
    schema: dict[tuple[str, str], str] = {}
    for cls in _dataclasses(config_tree):
        for field, default, _ in _field_defaults(cls):
            schema.setdefault((field, default), f"{cls.name}.{field}")
    assert len(schema) > 50, "config.py parsed to too few defaulted fields"
    bad = [f"{path.relative_to(ROOT)}:{line}: {cls.name}.{field} repeats the default of {schema[field, default]}"
           for name, (path, tree) in _modules().items() if name != "avar_ray.config"
           for cls in _dataclasses(tree) if cls.name.endswith("Spec")
           for field, default, line in _field_defaults(cls) if (field, default) in schema]
    assert not bad, "Spec classes that repeat config.py defaults:\n" + "\n".join(bad)


def test_every_avar_command_has_its_module():
    from avar_ray.cli import COMMANDS as AVAR_COMMANDS

    mods = _modules()
    for name, (module, _) in AVAR_COMMANDS.items():
        assert module in mods, f"avar {name}: no module {module}"
        defined = {n.name for n in mods[module][1].body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, f"avar {name}: {module} lacks add_arguments/run"
