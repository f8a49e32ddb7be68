"""Layering (design.md 2.2): the pure-PyTorch library imports no service or entry-point package."""

from __future__ import annotations

import ast
import re
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
    src = """
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
"""
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
HYDRA = {
    "coordinator/__main__.py",
    "coordinator/data.py",
    "coordinator/sample.py",
    "worker/__main__.py",
    "worker/config.py",
}
ADAPTERS = {
    "ray": {"coordinator/workers.py"},
    "redis": {"worker/store.py", "coordinator/redis_server.py"},  # the run store; the embedded server
    "mlflow": {"coordinator/tracking.py", "coordinator/pyfunc_block.py"},
    "pyarrow": {"worker/storage.py", "worker/dataset.py"},
    "hydra": HYDRA,
    "omegaconf": HYDRA,
}
ROOT = LIBRARY.parent
PACKAGES = ("dblocks", "coordinator", "worker")


def _files(*packages: str) -> list[Path]:
    return sorted(p for d in packages for p in (ROOT / d).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("service", sorted(ADAPTERS))
def test_each_service_is_imported_only_by_its_adapters(service):
    users = {_rel(p) for p in _files("coordinator", "worker") if service in imported_top_level_names(p.read_text())}
    assert users == ADAPTERS[service]


def internal_imports(path: Path) -> set[str]:
    """The project modules a file imports, relative imports resolved (see ``project_imports``)."""
    return project_imports(path.read_text(), path.relative_to(ROOT).with_suffix("").parts[:-1])


def project_imports(source: str, package: tuple[str, ...]) -> set[str]:
    """Modules of dblocks/coordinator/worker that ``source`` (a module of ``package``) imports.
    In dblocks/models: ``from ..noise import x`` -> ``dblocks.noise``, ``from . import sizes`` ->
    ``dblocks.models.sizes``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                names.update([f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names])
            elif node.module and node.module.split(".")[0] in PACKAGES:
                names.add(node.module)
    return names


def test_project_imports_resolve_relative_imports():
    src = """
import torch, worker.store
from ..noise import sigma
from .layers import DiTLayer
from . import sizes
from dblocks.plan import BlockSpec
def f():
    import coordinator.run
"""
    found = project_imports(src, ("dblocks", "models"))
    assert found == {
        "worker.store",
        "dblocks.noise",
        "dblocks.models.layers",
        "dblocks.models.sizes",
        "dblocks.plan",
        "coordinator.run",
    }


# dblocks/models/ holds networks: it may use the paper's math and the other network modules only.
MODEL_IMPORTS = {
    f"dblocks.{m}"
    for m in ("noise", "precond", "loss", "sampling", "embedding", "masking", "levels", "errors", "models")
}


@pytest.mark.parametrize("path", _files("dblocks/models"), ids=_rel)
def test_models_import_only_the_math_and_other_models(path):
    bad = {m for m in internal_imports(path) if m not in MODEL_IMPORTS and not m.startswith("dblocks.models.")}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}: dblocks/models/ may use only {sorted(MODEL_IMPORTS)}"


@pytest.mark.parametrize("path", _files("worker"), ids=_rel)
def test_the_worker_never_imports_the_coordinator(path):
    assert "coordinator" not in imported_top_level_names(path.read_text())


# A kind is dispatched through the family registry, never by comparing its name (issue 16).
KIND_CHECK = re.compile(r"\bfamily\s*(==|!=)|\.family\s+(not\s+)?in\b")
REGISTRY = LIBRARY / "families" / "__init__.py"


@pytest.mark.parametrize("path", [p for p in _files(*PACKAGES) if p != REGISTRY], ids=_rel)
def test_no_string_checks_on_the_family_outside_the_registry(path):
    lines = enumerate(path.read_text().splitlines(), 1)
    hits = [f"{_rel(path)}:{i}: {line.strip()}" for i, line in lines if KIND_CHECK.search(line)]
    assert not hits, "dispatch through dblocks.families instead:\n" + "\n".join(hits)


def test_the_kind_check_pattern_sees_every_form():
    for line in ('if cfg.model.family == "dit":', "family != 'ar'", 'if run.model.family in ("ar", "mdm"):'):
        assert KIND_CHECK.search(line), line
    for line in ("for name, family in FAMILIES.items():", "family = run.family", "get_family(self.model.family)"):
        assert not KIND_CHECK.search(line), line
