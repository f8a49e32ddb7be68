"""The sampler: load all B registered blocks of one alias, check they form one plan, chain them.

Runs as a Ray actor (coordinator/workers.py) or in-process. It refuses a set with a missing
block, blocks from different plans (plan hash), or level ranges (tags ``lo``/``hi``: sigma, or
MDM's t) that do not tile the family's level range contiguously.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dblocks.build import export_levels
from dblocks.config import SampleConfig, resolve_device
from dblocks.families import get_family
from worker.config import load_run_config
from worker.dataset import open_dataset

from .tracking import load_registered_block, registry_versions


class BlockSetError(ValueError):
    pass


def check_block_set(tags: list[dict], prefix: str, alias: str) -> None:
    """``tags`` of versions ``<prefix>-block0..`` (block order): one plan, every block, contiguous."""
    where = f"{prefix}-block*@{alias}"
    if not tags:
        raise BlockSetError(
            f"{where}: no registered block {prefix}-block0 has alias {alias!r}; train and register the run first"
        )
    num = int(tags[0]["num_blocks"])
    if len(tags) != num:
        raise BlockSetError(f"{where}: block {len(tags)} of {num} is missing (found {len(tags)} blocks)")
    hashes = sorted({t["plan_hash"] for t in tags})
    if len(hashes) > 1:
        runs = sorted({t.get("run_id", "?") for t in tags})
        raise BlockSetError(
            f"{where}: blocks come from {len(hashes)} plans ({', '.join(hashes)}; runs {', '.join(runs)}); "
            "point the alias at blocks of one run"
        )
    for b, t in enumerate(tags):
        if int(t["block"]) != b or int(t["num_blocks"]) != num:
            raise BlockSetError(f"{where}: {prefix}-block{b} is tagged block {t['block']} of {t['num_blocks']}")
        if b + 1 < num and not math.isclose(float(t["lo"]), float(tags[b + 1]["hi"]), rel_tol=1e-9):
            raise BlockSetError(
                f"{where}: level ranges are not contiguous: block {b} starts at {t['lo']}, "
                f"block {b + 1} ends at {tags[b + 1]['hi']}"
            )


def block_set(tracking_uri: str, prefix: str, alias: str) -> list:
    """The registry versions of ``<prefix>-block*@alias``, checked to be one complete plan."""
    versions = registry_versions(tracking_uri, prefix, alias)
    check_block_set([v.tags for v in versions], prefix, alias)
    return versions


class Sampler:
    def __init__(self, tracking_uri: str, prefix: str, alias: str, device: str = "cpu"):
        """``device``: where the chained blocks run (a ``train.device`` value, resolved on this machine)."""
        versions = block_set(tracking_uri, prefix, alias)
        loaded = [load_registered_block(tracking_uri, v.name, alias) for v in versions]
        self.device = resolve_device(device)
        self.nets = [n.to(self.device) for n, _, _ in loaded]
        self.plan = [s for _, s, _ in loaded]
        self.meta = loaded[0][2]
        self.family = get_family(self.meta["model"]["family"])
        self.levels = export_levels(self.meta)
        self.versions = [(v.name, v.version) for v in versions]

    def info(self) -> dict:
        return {
            "versions": self.versions,
            "plan_hash": self.meta["plan_hash"],
            "ranges": [(s.lo, s.hi) for s in self.plan],
            "num_classes": getattr(self.nets[0].cfg, "num_classes", None),  # image families: 0 = unlabelled
        }

    def sample(self, labels: list[int], sample: dict, seed: int = 0) -> np.ndarray:
        """Class-conditional samples (N, C, H, W) in [-1, 1] from the chained blocks (image families)."""
        labels = torch.tensor(labels)
        return self.family.generate(
            self.nets, self.plan, self.levels, labels, SampleConfig(**sample), seed=seed
        ).numpy()

    def evaluate(self, config: dict) -> dict:
        """The family's metrics for this set on the run's held-out data (``config``: the run's
        RunConfig as a dict, ``data.path`` set to its prepared dataset)."""
        cfg = load_run_config(config)
        data = open_dataset(cfg.data.path)
        res = cfg.family.evaluate(self.nets, self.plan, cfg, data, baseline=self.meta.get("baseline", False))
        return {k: (v.cpu().numpy() if torch.is_tensor(v) else v) for k, v in res.items()}
