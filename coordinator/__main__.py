"""``dblocks-run`` / ``python -m coordinator [hydra overrides]``: the main job (e.g. ``experiment=debug``).

``only=[K, ...]`` trains just those blocks of the experiment, in this process (``workers.backend=inline``,
no baseline), and registers them: one block on one machine without a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dblocks.config import Backend, ConfigError, RunConfig
from worker.config import check_command_line, config_dir, fail, load_command, register
from worker.record import JobId
from worker.redaction import redact, redact_files, redact_logging

from .policy import Interrupted, Terminated


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its progress notes repeat ours; warnings still show
    redact_logging()


def redact_saved_config() -> None:
    """Hydra saved the composed config and the command line under the run directory (``.hydra/``):
    mask URL passwords there and make the files owner-only."""
    from hydra.core.hydra_config import HydraConfig

    runtime = HydraConfig.get()
    if runtime.output_subdir is not None:
        saved = Path(runtime.runtime.output_dir) / runtime.output_subdir
        if saved.is_dir():
            redact_files(saved)


def standalone(cfg: RunConfig, only: list[int]) -> tuple[RunConfig, list[JobId]]:
    """``only=[K, ...]``: these blocks alone, in this process, without the end-to-end baseline."""
    for k in only:
        if not 0 <= k < cfg.blocks.num:
            raise ConfigError(
                f"only={list(only)}: block {k} is not in 0..{cfg.blocks.num - 1} (blocks.num={cfg.blocks.num})"
            )
    inline = dataclasses.replace(cfg.workers, backend=Backend.inline)
    return dataclasses.replace(cfg, baseline=False, workers=inline), [JobId("blocks", k) for k in only]


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    setup_logging()
    redact_saved_config()
    from .errors import USER_ERRORS
    from .run import run

    try:
        run_cfg, args = load_command(cfg)
        jobs = None
        if args["only"]:
            run_cfg, jobs = standalone(run_cfg, args["only"])
        run(run_cfg, only=jobs)
    except USER_ERRORS as e:
        fail(e)
    except Interrupted as e:  # the run's MLflow runs are KILLED, its checkpoints valid: say how to go on
        print(f"interrupted; continue with: {resume_command(e.run_id, sys.argv[1:])}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt as e:  # before any run was opened: nothing to continue
        print("interrupted before a run was opened", file=sys.stderr)
        sys.exit(getattr(e, "code", 130))


def resume_command(run_id: str, argv: list[str]) -> str:
    """``python -m coordinator <the same overrides> resume=<run id>`` (passwords masked)."""
    kept = [a for a in argv if not a.startswith(("resume=", "+resume="))]
    return shlex.join(["python", "-m", "coordinator", *(redact(a) for a in kept), f"resume={run_id}"])


def stop_on_signals() -> None:
    """SIGTERM (``kill``, a scheduler's stop) is handled like Ctrl-C (SIGINT): it unwinds the run, whose
    context managers stop the workers, the embedded redis-server and the local Ray, and ends its
    MLflow runs KILLED; exit status 128 + the signal."""
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    stop_on_signals()
    register()
    try:
        cfg = check_command_line("config", sys.argv[1:])  # a wrong type or key: one line, before Hydra's report
        if cfg is not None:  # Hydra writes its run directory under output_dir before any of our code runs
            from .run import check_output_dir

            check_output_dir(Path(cfg.output_dir))
    except ConfigError as e:
        fail(e)
    _main()


if __name__ == "__main__":
    main()
