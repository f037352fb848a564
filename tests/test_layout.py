"""The layout's rules, read from the source: imports run one way, routes never import routes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONT_ENDS = {"cli"}  # mlxrun/cli/ may import convert and server


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("server", "convert"):
        parts.insert(0, "mlxrun")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _core_files() -> list[Path]:
    return [
        p
        for p in (ROOT / "mlxrun").rglob("*.py")
        if p.relative_to(ROOT / "mlxrun").parts[0] not in FRONT_ENDS
    ]


def _hits(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{p.relative_to(ROOT)} imports {name}"
        for p in files
        for name in _imports(p)
        if any(name == b or name.startswith(b + ".") for b in banned)
    )


def test_the_core_imports_neither_server_nor_convert_nor_http():
    files = _core_files()
    assert len(files) > 30  # the walk found the package
    banned = ("mlxrun.server", "mlxrun.convert", "starlette", "uvicorn")
    assert _hits(files, banned) == []


def test_convert_never_imports_the_server():
    files = list((ROOT / "convert").rglob("*.py"))
    assert _hits(files, ("mlxrun.server", "starlette", "uvicorn", "mlxrun.cli")) == []


def test_routes_never_import_routes():
    files = list((ROOT / "server" / "routes").glob("*.py"))
    routes = [f for f in files if f.name != "__init__.py"]
    assert len(routes) >= 8
    assert _hits(routes, ("mlxrun.server.routes",)) == []


def test_the_checker_sees_relative_imports(tmp_path):
    # A control: the rule above would catch `from .completions import x` inside routes/.
    route = ROOT / "server" / "routes" / "fim.py"
    names = _imports(route)
    assert "mlxrun.server.fim_groups" in names and "mlxrun.server.state.ServerState" in names


def test_importing_the_engine_loads_no_server_or_convert_module():
    code = (
        "import sys, mlxrun.engine, mlxrun.loader, mlxrun.parsing.tools;"
        "bad=[m for m in sys.modules if m.startswith(('mlxrun.server','mlxrun.convert','starlette'))];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_command_module_imports_first_in_a_fresh_interpreter():
    # A cycle through the command group (server/cli.py -> mlxrun.cli -> every command) breaks
    # whichever module a process happens to import first; tests and benchmarks start several.
    modules = ["mlxrun.server.cli"] + sorted(
        f"mlxrun.cli.{p.stem}"
        for p in (ROOT / "mlxrun" / "cli").glob("*.py")
        if p.stem not in ("__init__", "__main__")
    )
    assert "mlxrun.cli.group" in modules and len(modules) > 6
    for name in modules:
        code = f"import {name}; from mlxrun.cli import main; print(type(main).__name__)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "Group", (name, out.stderr[-800:])
