"""Entry point: ``python -m coordinator [hydra overrides]`` (e.g. ``experiment=debug``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dblocks.config import ConfigError, RunConfig


def to_run_config(cfg: DictConfig, *drop: str) -> RunConfig:
    """Hydra's composed config -> the library's typed RunConfig (validated; names the bad key)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", *drop):
        d.pop(key, None)
    return RunConfig.from_dict(d)


def fail(e: BaseException) -> None:
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        run_cfg = to_run_config(cfg)
    except ConfigError as e:
        fail(e)
    from .errors import USER_ERRORS
    from .run import run

    try:
        run(run_cfg)
    except USER_ERRORS as e:
        fail(e)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
