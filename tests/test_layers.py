"""The package's layers: no import cycles between its files (lazy imports inside functions count too; imports for
annotations only do not), the bottom layer (settings, records) imports no stage, and pipelines know nothing of
Airflow."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "include" / "nightshift"
STAGES = ("sources", "prep", "quality", "versioning", "training", "evaluation", "registry", "serving", "monitoring",
          "alerts", "reports", "pipelines", "airflow", "prompts", "retrieval")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every nightshift module and the nightshift modules it imports, anywhere in its code."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in
                       ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # for annotations only: never imported at run time
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_no_module_imports_itself_through_others():
    graph = imports()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                on_path.add(nxt)
                visit(nxt, [*path, nxt], on_path, done)
                on_path.discard(nxt)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_bottom_layer_imports_no_stage_and_pipelines_no_airflow():
    graph = imports()
    for bottom in ("nightshift.settings", "nightshift.records"):
        stages = {m for m in graph[bottom] if m.split(".")[1] in STAGES}
        assert not stages, f"{bottom} imports {sorted(stages)}"
    for name, targets in graph.items():
        if name.startswith("nightshift.pipelines."):
            upward = {t for t in targets if t.startswith("nightshift.airflow")}
            assert not upward, f"{name} imports {sorted(upward)}"
