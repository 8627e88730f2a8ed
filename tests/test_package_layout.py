"""The package's shape: no import circle between its modules, and docstrings that cite only
files in the repository."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsparse"
ROOT = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The dsparse modules ``path`` imports, at the top or inside functions (a late import
    hides a circle, it does not remove it); ``if TYPE_CHECKING:`` imports are annotations."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsparse"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dsparse"))
    return {name for name in found if name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: those it names, and the packages above them
    (importing ``a.b.c`` first runs ``a/__init__`` and ``a/b/__init__``) outside its own."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for target in imports_of(path, set(files)):
            edges.add(target)
            parent = target.rsplit(".", 1)[0]
            while parent != "dsparse" and name != parent and not name.startswith(parent + "."):
                edges.add(parent)
                parent = parent.rsplit(".", 1)[0]
        graph[name] = edges - {name}
    return graph


def test_no_import_circle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_docstrings_cite_only_files_in_the_repository():
    cited = re.compile(r"DESIGN\.md|\.\./shared/")
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if cited.search(p.read_text())]
    assert offenders == [], f"cite docs/design.md instead of a file outside the repository: {offenders}"
