"""Layering (design.md 2.2): the pure-PyTorch library imports no service or entry-point package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dblocks

FORBIDDEN = {"ray", "redis", "mlflow", "hydra", "omegaconf", "pyarrow"}
LIBRARY = Path(dblocks.__file__).resolve().parent


def imported_top_level_names(source: str) -> set[str]:
    """Top-level package of every import anywhere in the module (nested in functions, try blocks,
    ``if TYPE_CHECKING``), plus ``importlib.import_module("x")`` / ``__import__("x")`` with a literal."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def _library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_the_library_has_modules_to_check():
    files = {p.relative_to(LIBRARY).as_posix() for p in _library_files()}
    assert {"__init__.py", "noise.py", "precond.py", "loss.py", "sampling.py", "trainer.py", "models/dit.py"} <= files


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: p.relative_to(LIBRARY).as_posix())
def test_library_module_imports_no_service_package(path):
    bad = imported_top_level_names(path.read_text()) & FORBIDDEN
    assert not bad, f"{path.relative_to(LIBRARY)} imports {sorted(bad)}"


def test_the_import_detector_sees_every_form():
    src = '''
import os, ray.util as ru
from redis.client import Redis
from . import noise
from .models import dit
def f():
    import mlflow
    try:
        from hydra import compose
    except ImportError:
        pass
class C:
    def g(self):
        import importlib
        importlib.import_module("pyarrow.parquet")
        return __import__("omegaconf")
'''
    found = imported_top_level_names(src)
    assert FORBIDDEN <= found
    assert "os" in found and "importlib" in found
    assert "noise" not in found and "models" not in found  # relative imports are the library's own


def test_importing_the_library_loads_no_service_package():
    """At run time too: a fresh interpreter that imports all of dblocks has none of them in sys.modules."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, dblocks\n"
        "for m in pkgutil.walk_packages(dblocks.__path__, 'dblocks.'): importlib.import_module(m.name)\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(FORBIDDEN)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Each service is adapted in a few files of coordinator/ and worker/ (issue: distributed trainer).
ADAPTERS = {
    "ray": {"coordinator/launch.py"},
    "redis": {"worker/state.py"},
    "mlflow": {"coordinator/tracking.py", "coordinator/pyfunc_block.py"},
    "pyarrow": {"worker/storage.py", "worker/shards.py"},
    "hydra": {"coordinator/__main__.py", "coordinator/sample.py", "worker/__main__.py"},
}
ROOT = LIBRARY.parent


@pytest.mark.parametrize("service", sorted(ADAPTERS))
def test_each_service_is_imported_only_by_its_adapters(service):
    users = {p.relative_to(ROOT).as_posix() for d in ("coordinator", "worker") for p in (ROOT / d).rglob("*.py")
             if service in imported_top_level_names(p.read_text())}  # fmt: skip
    assert users == ADAPTERS[service]
