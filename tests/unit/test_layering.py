"""Import layering of the etcdproxy package (issue 13 item 4), read from the source with ast.

Rules: core/ is pure (no hub/worker/ipc, no asyncio/zmq/grpc); the ipc schema and codec know nothing of
processes or sockets; hub/ and worker/ never import each other; the hub subsystems are typed against
hub/host.py, never hub/process.py; grpc is imported nowhere but tls.py (late, inside functions, for the
grpc-based test clients) and the generated etcdpb/*_pb2_grpc.py stubs; and the modules' top-level imports
form no cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "etcdproxy"


@dataclass(frozen=True, slots=True)
class Import:
    target: str  # dotted module name, e.g. "etcdproxy.hub.process" or "asyncio"
    top_level: bool  # executed when the module is imported: not in a function, not under TYPE_CHECKING
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend(Import(alias.name, top, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                out.append(Import(base, top, child.lineno))
                # "from etcdproxy import tls" imports the submodule etcdproxy.tls
                out.extend(Import(f"{base}.{alias.name}", top, child.lineno) for alias in child.names)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), top)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return out


def _collect() -> dict[str, tuple[Path, list[Import]]]:
    modules: dict[str, tuple[Path, list[Import]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        modules[name] = (path, _imports(path, name))
    return modules


MODULES = _collect()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(module_prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for name, (_, imports) in MODULES.items():
        if not _under(name, module_prefix):
            continue
        for imp in imports:
            if any(_under(imp.target, f) for f in forbidden):
                bad.append(f"{name}:{imp.line} imports {imp.target}")
    return bad


def test_the_walk_sees_the_package() -> None:
    assert "etcdproxy.core.broadcast" in MODULES
    assert "etcdproxy.hub.process" in MODULES
    hub_imports = {imp.target for imp in MODULES["etcdproxy.hub.process"][1]}
    assert {"etcdproxy.hub.watch", "etcdproxy.hub.host", "zmq"} <= hub_imports
    # TYPE_CHECKING imports are collected too (and marked not top-level)
    watch = MODULES["etcdproxy.hub.watch"][1]
    assert any(imp.target == "etcdproxy.hub.host" and not imp.top_level for imp in watch)


def test_core_is_pure() -> None:
    forbidden = ("etcdproxy.hub", "etcdproxy.worker", "etcdproxy.ipc", "asyncio", "zmq", "grpc")
    assert _violations("etcdproxy.core", forbidden) == []


def test_core_imports_only_core_etcdpb_and_status() -> None:
    allowed = ("etcdproxy.core", "etcdproxy.etcdpb", "etcdproxy.h2.status")
    bad = [
        f"{name}:{imp.line} imports {imp.target}"
        for name, (_, imports) in MODULES.items()
        if _under(name, "etcdproxy.core")
        for imp in imports
        if _under(imp.target, "etcdproxy")
        and imp.target != "etcdproxy"  # the "from etcdproxy import x" base; x itself is checked
        and not any(_under(imp.target, a) for a in allowed)
    ]
    assert bad == []


def test_ipc_schema_and_codec_know_no_processes() -> None:
    forbidden = ("etcdproxy.hub", "etcdproxy.worker", "asyncio", "zmq")
    assert _violations("etcdproxy.ipc.schema", forbidden) == []
    assert _violations("etcdproxy.ipc.codec", forbidden) == []


def test_hub_and_worker_do_not_import_each_other() -> None:
    assert _violations("etcdproxy.hub", ("etcdproxy.worker",)) == []
    assert _violations("etcdproxy.worker", ("etcdproxy.hub",)) == []


def test_no_hub_subsystem_imports_the_hub_process() -> None:
    bad = _violations("etcdproxy.hub", ("etcdproxy.hub.process",))
    bad = [v for v in bad if not v.startswith("etcdproxy.hub.process:")]
    assert bad == []


def test_grpc_only_in_tls_late_and_generated_stubs() -> None:
    bad = []
    for name, (path, imports) in MODULES.items():
        if path.name.endswith("_pb2_grpc.py"):  # protoc output, imported only by the grpc-based tests
            continue
        for imp in imports:
            if not _under(imp.target, "grpc"):
                continue
            if name == "etcdproxy.tls" and not imp.top_level:
                continue
            bad.append(f"{name}:{imp.line} imports {imp.target}")
    assert bad == []


def _top_level_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (_, imports) in MODULES.items():
        graph[name] = {imp.target for imp in imports if imp.top_level and imp.target in MODULES and imp.target != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)) is not None:
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle_among_top_level_imports() -> None:
    graph = _top_level_graph()
    # importing etcdproxy.a.b runs etcdproxy/__init__ and etcdproxy/a/__init__ first, so a package __init__ that
    # imports one of its own submodules is not a cycle in the sense that matters here: drop those edges
    for name in graph:
        graph[name] -= _parents(name)
    assert _find_cycle(graph) is None


# The one remaining mutual import, both late (inside functions): main() starts the supervisor, and the supervisor
# parses the command line again on SIGHUP (reload). Not part of issue 13 item 4.
KNOWN_MUTUAL = {("etcdproxy.cli", "etcdproxy.supervisor")}


def test_no_two_modules_import_each_other_even_late() -> None:
    # counts every import: late (in functions) and TYPE_CHECKING ones, e.g. config <-> tls, hub.process <-> hub.watch
    graph = {
        name: {imp.target for imp in imports if imp.target in MODULES and imp.target != name} - _parents(name)
        for name, (_, imports) in MODULES.items()
    }
    mutual = {(a, b) for a in graph for b in graph[a] if a < b and a in graph[b]}
    assert mutual == KNOWN_MUTUAL
