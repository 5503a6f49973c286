"""The house's layers: every import points down (an AST walk over every module, lazy imports included).

    common/                       what both apps share
    client/  server/              the two apps: siblings, never importing each other
    evaluation/  deploy/          on top of the apps
    simulations/  bench/          runners and benchmarks, on top of everything above
    scripts/                      asset builders and wrappers

A package may import a package of a lower layer (or itself), nothing of its own layer or above.
The one exception is named: the server-scale benchmark drives the strategies through the
tests' synthetic grid (tests/server/grids.py), so that the double lives in tests/.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"common": 0, "client": 1, "server": 1, "evaluation": 2, "deploy": 2, "simulations": 3, "bench": 3,
         "scripts": 4}
ALLOWED = {("bench/scale.py", "tests.server.grids")}
OURS = set(LAYER) | {"tests"}


def imported_modules(path: Path) -> list[str]:
    """Every absolute module ``path`` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def package_modules() -> list[Path]:
    return sorted(p for package in LAYER for p in (ROOT / package).rglob("*.py"))


def upward_imports() -> list[str]:
    bad = []
    for path in package_modules():
        rel = path.relative_to(ROOT).as_posix()
        own = rel.split("/")[0]
        for module in imported_modules(path):
            target = module.split(".")[0]
            if target not in OURS or target == own or (rel, module) in ALLOWED:
                continue
            if target == "tests" or LAYER[target] >= LAYER[own]:
                bad.append(f"{rel} imports {module} ({own}: layer {LAYER[own]}, {target}: "
                           f"{'tests' if target == 'tests' else 'layer ' + str(LAYER[target])})")
    return bad


def test_every_import_points_down():
    assert upward_imports() == []


def test_the_check_sees_lazy_imports_and_reports_them(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from client.app import app\n    import server.export\n")
    assert imported_modules(module) == ["os", "client.app", "server.export"]


@pytest.mark.parametrize("package", sorted(LAYER))
def test_each_package_is_walked(package):
    # a package folder that disappeared or lost its modules would pass the import check vacuously
    assert any(p.relative_to(ROOT).parts[0] == package for p in package_modules())


def test_the_app_bundle_carries_common_client_and_server_only():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert sorted(flwr["fab-include"]) == ["client/**/*.py", "common/**/*.py", "server/**/*.py"]
    for component in flwr["components"].values():
        assert component.split(".")[0] in ("client", "server")


def test_the_wheel_carries_every_package_the_readme_commands_run():
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert set(wheel["packages"]) == set(LAYER) - {"scripts"}
