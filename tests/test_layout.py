"""The package's layout: imports go one way (no cycle, even through imports inside functions).

``python tests/test_layout.py`` prints the graph: each module and the project modules it imports.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """Module -> the rl_agents / envs modules it imports, at module level or inside a function."""
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for package in ("rl_agents", "envs")
        for p in (ROOT / package).rglob("*.py")
    }
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # "from a.b import c, d": the submodules a.b.c and a.b.d where they are modules, else a.b
                names = {f"{node.module}.{alias.name}" for alias in node.names} & set(files) or {node.module}
            else:
                continue
            edges |= {name for name in names if name in files and name != module}
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_go_one_way():
    graph = import_graph()
    assert "rl_agents.runtime.engine" in graph and "rl_agents.config" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module", ["rl_agents.config", "rl_agents.validate"])
def test_the_schema_and_its_checks_import_no_trainer(module):
    """The schemas (rl_agents.config) and their checks (rl_agents.validate) are read before any stage: neither
    may pull in a trainer."""
    graph = import_graph()
    reachable, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()] - reachable:
            reachable.add(nxt)
            todo.append(nxt)
    trainers = {
        "rl_agents.bc",
        "rl_agents.dagger",
        "rl_agents.grpo",
        "rl_agents.ppo",
        "rl_agents.rl",
        "rl_agents.train",
    }
    assert not reachable & trainers


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


if __name__ == "__main__":
    for module, edges in sorted(import_graph().items()):
        print(f"{module}: {' '.join(sorted(edges)) or '-'}")
