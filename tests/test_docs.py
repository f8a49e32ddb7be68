"""The generated docs are up to date with what they are generated from."""

from __future__ import annotations

import importlib.util

from services import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    gen = _load("gen_configuration")
    assert gen.OUT.read_text() == gen.render(), f"docs/configuration.md is out of date: run {gen.REGENERATE}"


def test_configuration_reference_has_every_key():
    """Every leaf key of the schema's default config (what ``params()`` logs) has a row."""
    from dblocks.config import RunConfig

    text = (ROOT / "docs" / "configuration.md").read_text()
    keys = list(RunConfig().params())
    assert keys and all(f"| `{k}` |" in text for k in keys), [k for k in keys if f"| `{k}` |" not in text]
