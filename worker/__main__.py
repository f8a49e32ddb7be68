"""``dblocks-worker`` / ``python -m worker block=K run=<run id> redis.url=redis://host:6379/0``: join a
running job from any machine (e.g. one small GPU) and consume block K's work units like the
coordinator's own workers (the coordinator leaves blocks to external workers with
``workers.external=[K]``). To train a block alone from a config, use ``dblocks-run experiment=... only=[K]``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import hydra
from omegaconf import DictConfig

from dblocks.config import ConfigError
from dblocks.datacard import DataError

from .config import check_command_line, config_dir, fail, load_command, register
from .record import JobId
from .storage import StorageError
from .store import RECONNECT_SECONDS, StoreError

USER_ERRORS = (ConfigError, StoreError, StorageError, DataError)


def join(block: int, run_id: str, redis_url: str, reconnect_seconds: float = RECONNECT_SECONDS) -> None:
    """Train block ``block`` of the running job ``run_id`` until its work units are done (riding out a
    Redis outage of up to ``reconnect_seconds``)."""
    from .block_worker import BlockWorker
    from .store import open_store

    store = open_store(redis_url, reconnect_seconds)
    blocks = [job.id.index for job in store.manifest(run_id).jobs_of("blocks")]
    if block not in blocks:
        raise ConfigError(f"block={block}: run {run_id} has blocks {min(blocks)}..{max(blocks)}")
    consumer = f"external-{socket.gethostname()}-{os.getpid()}"
    result = BlockWorker(store, run_id, JobId("blocks", block), consumer).run()
    print(f"block {block} of run {run_id} done: {result['units']} units, {result['samples']} samples")


@hydra.main(config_path=config_dir(), config_name="worker", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        run_cfg, args = load_command(cfg)
        block, run_id = args["block"], args["run"]
        if block is None or block < 0:
            raise ConfigError(f"block={block}: pass the block index to train, e.g. block=0")
        if run_id is None:
            raise ConfigError(
                f"run is missing: join a running job with run=<run id> redis.url=...; to train block "
                f"{block} alone use dblocks-run experiment=... only=[{block}]"
            )
        if not run_cfg.redis.url:
            raise ConfigError(
                f"redis.url is missing: pass the run store of run {run_id}, e.g. redis.url=redis://host:6379/0 "
                "(the coordinator logs it)"
            )
        join(block, run_id, run_cfg.redis.url, run_cfg.redis.reconnect_seconds)
    except USER_ERRORS as e:
        fail(e)


def main() -> None:
    register()
    try:
        check_command_line("worker", sys.argv[1:])  # a wrong type or key: one line, before Hydra's report
    except ConfigError as e:
        fail(e)
    _main()


if __name__ == "__main__":
    main()
