"""The packages depend one way (DESIGN.md): kdf and common at the bottom, the key source
(kms) and the data planes (ipsec, tls) on them, the gateway on those contracts, and one
composition root (gateway/site.py) that knows which sinks exist. Checked on the imports the
code actually makes (module level and inside functions), read with `ast`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "kdf", "kms", "ipsec", "tls", "gateway")
#: What each package may import of ours, besides itself.
ALLOWED = {
    "kdf": set(),
    "common": {"kdf"},
    "kms": {"common"},
    "ipsec": {"common", "kdf"},
    "tls": {"common", "kdf"},
    "gateway": {"common", "kdf", "kms"},
}
#: The composition root and the entry points above it (the CLI, the demo that runs it all).
TOP = {"gateway.site", "gateway.cli", "gateway.demo", "gateway.entry", "gateway.hanotify"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours PATH imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # "from a.b import c" names module a.b.c if there is one, else the name c in a.b
        graph[name] = {m if m in files else m.rsplit(".", 1)[0] for m in _imports(path)}
        graph[name] = {m for m in graph[name] if m in files and m != name}
    return graph


def _top(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOP)


def test_packages_depend_one_way() -> None:
    wrong = []
    for module, deps in sorted(_graph().items()):
        if _top(module):
            continue
        pkg = module.split(".")[0]
        for dep in sorted(deps):
            other = dep.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                wrong.append(f"{module} imports {dep}")
            elif _top(dep):
                wrong.append(f"{module} imports {dep}, which sits above it")
    assert wrong == []


def test_only_the_composition_root_imports_the_sinks() -> None:
    importers = sorted({m for m, deps in _graph().items() if m.startswith("gateway")
                        and any(d.split(".")[0] in ("ipsec", "tls") for d in deps)})
    assert importers == ["gateway.site"]


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone(package: str) -> None:
    """In a fresh interpreter, every module of PACKAGE imports, in any order it is asked."""
    modules = sorted(m for m in _graph() if m.split(".")[0] == package)
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for order in (modules, list(reversed(modules))):
        r = subprocess.run([sys.executable, "-c", script, *order], capture_output=True,
                           text=True, cwd=REPO, check=False)
        assert r.returncode == 0, r.stderr
