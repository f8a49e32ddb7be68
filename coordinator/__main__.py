"""Entry point: ``python -m coordinator [hydra overrides]`` (e.g. ``experiment=debug``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dblocks.config import ConfigError, RunConfig


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Hydra's composed config -> the library's typed RunConfig (validated; names the bad key)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    return RunConfig.from_dict(d)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        run_cfg = to_run_config(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from .run import run

    run(run_cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
