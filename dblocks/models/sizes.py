"""Size registries (as DiT's ``DiT_models``): a family's named sizes plus per-key overrides."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TypeVar

T = TypeVar("T")


def sized(sizes: dict[str, T], size: str, family: str, **overrides) -> T:
    """``sizes[size]`` with the non-None ``overrides`` applied; a key the family does not have
    is an error naming it (``model.<key>``), so a typo never passes silently."""
    if size not in sizes:
        raise ValueError(f"model.size={size!r}: unknown size for the {family} family, choose one of {', '.join(sizes)}")
    base = sizes[size]
    names = [f.name for f in fields(base)]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ValueError(
            f"model.{unknown[0]}={given[unknown[0]]!r}: not a setting of the {family} family "
            f"(it has {', '.join(names)}); remove it"
        )
    return replace(base, **given)
