"""The package's shape: no import circles between its modules, and nothing in it names a file
outside the repository (a user's clone has only the repository)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "minimimo"
# the workspace's spec folder, its section marks, and this machine's work folder: spelled in pieces
# so that this file does not name them itself
FORBIDDEN = ("../" + "shared", "SPEC " + "§", "/" + "work" + "/")


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative imports, `from . import x` included)."""
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[name] = deps & modules.keys()
    return graph


def test_no_import_circles():
    graph, done, circles = import_graph(), set(), []

    def visit(module, path):
        for dep in graph[module]:
            if dep in path:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])
    assert not circles, circles


def test_the_graph_sees_a_circle_when_there_is_one():
    graph = import_graph()
    assert "config" in graph["cache"] and "cache" not in graph["config"]  # the walker reads real edges


def test_no_file_names_the_workspace_outside_the_repository():
    hits = []
    for path in [*PACKAGE.rglob("*.py"), *REPO.glob("*.md"), *(REPO / "notebooks").rglob("*.ipynb"),
                 *(REPO / "notebooks").rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        text = path.read_text(errors="replace")
        hits += [f"{path.relative_to(REPO)}: {word}" for word in FORBIDDEN if word in text]
    assert not hits, hits
