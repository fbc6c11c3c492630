"""Imports flow one way: CLI/composition root -> edge, actors (siblings) -> runtime -> broker; errors and settings are the ground.

Every import statement of every module counts, lazy ones inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

FOLDERS = {"actors": "actors", "broker": "broker", "runtime": "runtime", "edge": "edge", "benchmarks": "benchmarks"}
GROUND = {"inferq.errors", "inferq.settings"}
ROOT_MODULES = {"inferq", "inferq.cli", "inferq.up"}

# layer -> the layers it may import
ALLOWED = {
    "root": {"root", "client", "edge", "actors", "runtime", "broker", "benchmarks", "ground"},
    "benchmarks": {"benchmarks", "client", "runtime", "broker", "ground"},
    "edge": {"edge", "runtime", "broker", "ground"},
    "actors": {"actors", "runtime", "broker", "ground"},
    "runtime": {"runtime", "broker", "ground"},
    "broker": {"broker", "ground"},
    "client": {"client", "broker", "ground"},
    "ground": {"ground"},
}


def layer(module: str) -> str | None:
    """The layer of an ``inferq`` module name, None for anything outside inferq."""
    if module in GROUND or any(module.startswith(g + ".") for g in GROUND):
        return "ground"
    if module in ROOT_MODULES:
        return "root"
    parts = module.split(".")
    if parts[0] != "inferq":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    return "client" if len(parts) > 1 and parts[1].startswith("client") else "root"


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["inferq", *parts[1:]] if parts[0] == "inferq" else ["inferq", *parts])


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
    # "from inferq import errors" names a module; "from inferq.x import name" names something in x.
    return [f"{base}.{a.name}" if base == "inferq" else base for a in node.names]


def violations() -> list[str]:
    found = []
    files = [p for folder in [*FOLDERS.values(), "inferq"] for p in (ROOT / folder).rglob("*.py")]
    for path in files:
        module = module_of(path)
        mine = layer(module)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            for target in imported(node, module, path.name == "__init__.py"):
                theirs = layer(target)
                if theirs is not None and theirs not in ALLOWED[mine]:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module} ({mine}) imports {target} ({theirs})")
    return found


def test_imports_flow_one_way_from_the_cli_down_to_the_broker() -> None:
    assert violations() == []


def test_the_layering_check_catches_an_upward_import() -> None:
    assert layer("inferq.broker.codec") == "broker" and layer("inferq.errors") == "ground"
    assert "edge" not in ALLOWED["actors"] and "actors" not in ALLOWED["edge"], "edge and actors are siblings"
    node = ast.parse("from inferq.edge.jobs import JobService").body[0]
    target = imported(node, "inferq.runtime.loader", False)[0]
    assert layer(target) not in ALLOWED[layer("inferq.runtime.loader")]
