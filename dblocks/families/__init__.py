"""The family registry: every model kind the system trains, by its ``model`` config option.

A new family is ``dblocks/models/<name>.py`` (network, config dataclass, sizes) plus
``dblocks/families/<name>.py`` (a :class:`Family` subclass) plus one line here.
"""

from __future__ import annotations

from ..errors import ConfigError
from .ar import AR
from .base import Family, Headline, LossFn, Row
from .dit import DiT
from .mdm import MDM
from .recurrent import Recurrent
from .vit import ViT

FAMILIES: dict[str, Family] = {f.name: f for f in (DiT(), ViT(), AR(), MDM(), Recurrent())}


def get_family(name: str) -> Family:
    """The registered family called ``name``; an unknown name is a one-line config error."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model={name!r}: no such family; choose one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "Headline", "LossFn", "Row", "get_family"]
