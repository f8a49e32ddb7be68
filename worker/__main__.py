"""``python -m worker``: one block's worker, on any machine (e.g. one small GPU).

    python -m worker block=K run=<run id> redis.url=redis://host:6379/0
        joins a running job: consumes block K's work units like the coordinator's own actors
        (the coordinator leaves blocks to external workers with workers.external=[K]).
    python -m worker block=K experiment=dit_digits
        trains block K of that experiment alone, in this process, and registers it in MLflow.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dblocks.config import ConfigError


@hydra.main(config_path="../configs", config_name="worker", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    block, run_id = d.pop("block"), d.pop("run")
    try:
        if not isinstance(block, int) or block < 0:
            raise ConfigError(f"block={block}: pass the block index to train, e.g. block=0")
        if run_id is not None:
            join(block, run_id, d["redis"]["url"])
        else:
            standalone(block, d)
    except (ConfigError, RuntimeError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def join(block: int, run_id: str, redis_url: str | None) -> None:
    from .block_worker import BlockWorker
    from .state import RunState

    if not redis_url:
        raise ConfigError("run=...: also pass redis.url=redis://host:port/0 (the coordinator logs it)")
    jobs = RunState(redis_url).manifest(run_id)["jobs"]
    blocks = sorted(int(j.split("/")[1]) for j in jobs if j.startswith("blocks/"))
    if block not in blocks:
        raise ConfigError(f"block={block}: run {run_id} has blocks {blocks[0]}..{blocks[-1]}")
    consumer = f"external-{socket.gethostname()}-{os.getpid()}"
    result = BlockWorker(redis_url, run_id, f"blocks/{block}", consumer).run()
    print(f"block {block} of run {run_id} done: {result['units']} units, {result['samples']} samples")


def standalone(block: int, d: dict) -> None:
    from coordinator.run import run
    from dblocks.config import RunConfig

    d["baseline"] = False
    d.setdefault("workers", {})["backend"] = "inline"
    cfg = RunConfig.from_dict(d)
    if block >= cfg.blocks.num:
        raise ConfigError(f"block={block}: blocks.num={cfg.blocks.num} gives blocks 0..{cfg.blocks.num - 1}")
    run(cfg, only=[f"blocks/{block}"])


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
