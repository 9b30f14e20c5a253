"""The package as installed: a wheel ships every file the library opens at run time; no import cycle between
``adapter.py`` and ``reference.py``."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "psa_adapter"


def _package_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the package sources (the checkout itself stays clean)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for path in _package_files():
        target = src / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", str(src), "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (found,) = out.glob("psa_adapter-*.whl")
    return found


def test_wheel_ships_every_package_file_and_the_resources(wheel):
    from psa_adapter.users._templates import RESOURCES, resources_dir

    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [str(p.relative_to(REPO)) for p in _package_files() if str(p.relative_to(REPO).as_posix()) not in names]
    assert not missing, f"the package-data globs in pyproject.toml miss {missing}"
    assert sorted(p.name for p in resources_dir().iterdir()) == sorted(RESOURCES)
    assert {f"psa_adapter/users/resources/{name}" for name in RESOURCES} <= names


def test_installed_wheel_reads_levels_and_templates_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import psa_adapter, pathlib, sys\n"
            "from psa_adapter.users import load_level, level_names\n"
            "from psa_adapter.users.encoders import load_statement_template, safety_statement\n"
            "from psa_adapter.users._templates import load_template\n"
            f"assert pathlib.Path(psa_adapter.__file__).is_relative_to({str(site)!r}), psa_adapter.__file__\n"
            "assert level_names() == ['L0', 'L1', 'L2', 'L3', 'L4', 'L5']\n"
            "assert 'banned' in load_statement_template()\n"
            "print(safety_statement(load_level('L3')))\n"
            "print(load_template(None, 'policy_prompt.txt', {'age', 'age_group', 'gender', 'religion', "
            "'physical_condition', 'mental_condition', 'categories', 'user_id'})[1])\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(site / "psa_adapter" / "users" / "resources" / "policy_prompt.txt") in result.stdout


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (functions included), from the syntax."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(prefix + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_adapter_and_reference_are_not_in_an_import_cycle():
    graph = _import_graph()
    assert "psa_adapter.reference" in graph["psa_adapter.adapter"]  # the graph sees imports (the test can fail)
    for module in ("psa_adapter.adapter", "psa_adapter.reference"):
        in_cycle = sorted(m for m in _reachable(graph, module) if module in _reachable(graph, m))
        assert not in_cycle, f"{module} is in an import cycle with {in_cycle}"
