"""The package imports downward only (docs/architecture.md): read every module of pooler/ with
ast, collect every import of another pooler module (at module level, inside functions and under
TYPE_CHECKING alike) and check the layers. No PostgreSQL needed."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pooler"

# the layers, bottom up: a module may import its own layer's modules and those of lower layers
LAYERS = [
    {"pooler", "pooler.protocol", "pooler.sql", "pooler.tls", "pooler.auth"},
    {"pooler.masking"},
    {"pooler.policy", "pooler.config", "pooler.approvals", "pooler.audit", "pooler.recording"},
    {"pooler.gateway"},
    {"pooler.runtime", "pooler.pgcluster"},
    {"pooler.cli", "pooler.demo", "pooler.__main__", "pooler.cli_approvals", "pooler.cli_recordings", "pooler.cli_replay"},
]

# inside the asyncio shell, bottom up: each module imports only modules listed before it
GATEWAY_ORDER = [
    "interfaces", "netopts", "params", "events", "server", "pool", "catalogs", "statements", "approval_store", "holds",
    "governor", "admin", "login", "session", "observers", "recorder", "audit", "metrics", "approvals_http", "app",
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The pooler modules ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pooler")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pooler":
                continue
            for a in node.names:  # `from . import config` names a module
                if (PKG.parent / (target + "." + a.name).replace(".", "/")).with_suffix(".py").exists():
                    found.add(f"{target}.{a.name}")
                else:
                    found.add(target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def layer_of(mod: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{mod} is in no layer: add it to LAYERS"
    return best[0]


def test_no_module_imports_a_higher_layer():
    bad = [f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})"
           for mod, deps in graph().items() for dep in deps
           if layer_of(dep) > layer_of(mod) and dep != "pooler"]
    assert not bad, "\n".join(sorted(bad))


def test_the_pure_layers_import_nothing_of_the_asyncio_shell():
    pure = ("pooler.protocol", "pooler.sql", "pooler.policy", "pooler.masking", "pooler.auth", "pooler.config",
            "pooler.approvals", "pooler.audit")
    bad = [f"{mod} imports {dep}" for mod, deps in graph().items() if mod.startswith(pure)
           for dep in deps if dep.startswith(("pooler.gateway", "pooler.cli", "pooler.demo", "pooler.runtime"))]
    assert not bad, "\n".join(bad)


def test_gateway_modules_import_downward_only():
    g = graph()
    have = {m.rpartition(".")[2] for m in g if m.startswith("pooler.gateway.")}
    assert have <= set(GATEWAY_ORDER), f"gateway modules missing from GATEWAY_ORDER: {have - set(GATEWAY_ORDER)}"
    bad = []
    for mod, deps in g.items():
        if not mod.startswith("pooler.gateway."):
            continue
        me = GATEWAY_ORDER.index(mod.rpartition(".")[2])
        for dep in deps:
            if dep.startswith("pooler.gateway."):
                if GATEWAY_ORDER.index(dep.rpartition(".")[2]) >= me:
                    bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(bad)


def test_there_is_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(g.get(mod, ())):
            if dep == "pooler" or dep not in g:
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[mod] = 2

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(cycles)


def test_the_layer_check_sees_imports_inside_functions_and_type_checking(tmp_path):
    # the checker itself: a lazy import and a TYPE_CHECKING import both count
    pkg = tmp_path / "pooler"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    f = pkg / "a" / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import x\n"
                 "def g():\n    from .n import y\n")
    global PKG
    old, PKG = PKG, pkg
    try:
        assert imports_of(f) == {"pooler.b", "pooler.a.n"}
    finally:
        PKG = old
