"""The parts' import arrows, read from the source: no import circles, and each part imports only
the parts below it (DESIGN.md §1): common <- everything; client -> common; http_frontend -> client;
model_server -> client (admin calls); admin_server -> common; the saxutil launcher -> client, and
the server parts only lazily, inside the commands that delegate to them."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("common", "client", "admin_server", "model_server", "http_frontend", "saxutil")
#: part -> the parts it may import at all (at import time or lazily)
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "admin_server": {"common"},
    "model_server": {"common", "client"},
    "http_frontend": {"common", "client"},
    "saxutil": {"common", "client", "admin_server", "model_server"},
}
#: imports a part may make only lazily (inside a function: when a command delegates)
LAZY_ONLY = {"saxutil": {"admin_server", "model_server"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for part in PARTS for p in (REPO / part).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported project module, at import time) for each import in the file; imports under
    `if TYPE_CHECKING:` are left out (they never run)."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                         for a in child.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    out.append((name, top))
            visit(child, inner)
    visit(tree, True)
    return out


def _graph() -> dict[str, list[tuple[str, bool]]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    return module.split(".", 1)[0]


def test_parts_import_only_the_parts_below_them() -> None:
    wrong = []
    for module, imports in _graph().items():
        src = _part(module)
        for target, at_import in imports:
            dst = _part(target)
            if dst == src:
                continue
            if dst not in ALLOWED[src]:
                wrong.append(f"{module} imports {target}")
            elif at_import and dst in LAZY_ONLY.get(src, set()):
                wrong.append(f"{module} imports {target} at import time (only a command may, lazily)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    """No cycle among the modules' imports, lazy ones (inside functions) included: a circle of
    imports is a circle of dependencies however late one side is imported."""
    graph = {m: sorted({t for t, _ in imps if t != m}) for m, imps in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                walk(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_client_loads_no_server_part() -> None:
    """Importing the client library and its CLI brings in no admin, model server or frontend code."""
    code = ("import sys, client.sax, client.cli, client.router, client.transport; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'admin_server', 'model_server', 'http_frontend', 'saxutil'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    assert out == "[]", out
