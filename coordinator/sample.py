"""``python -m coordinator.sample [alias=champion] [out=grid.png] [experiment=...]``: load the
registered blocks of one alias into a sampler actor, sample a 10 x 10 grid (row = digit), write
it as a PNG and log it to the run that trained the blocks."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dblocks.config import ConfigError

from .__main__ import fail, to_run_config


@hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    from .errors import USER_ERRORS
    from .launch import make_launcher
    from .report import save_grid
    from .run import artifact_location, default_tracking_uri
    from .sampler import block_set
    from .tracking import Tracker, registry_versions

    try:
        run_cfg = to_run_config(cfg, "alias", "out", "model_prefix")
        if run_cfg.model.family != "dit":
            raise ConfigError(f"model.family={run_cfg.model.family}: coordinator.sample draws digit grids (dit); the main job "
                              "evaluates every family's set from the registry and writes output_dir/<model>/sample.txt")  # fmt: skip
        uri, prefix = default_tracking_uri(run_cfg), cfg.model_prefix or run_cfg.name
        block_set(uri, prefix, cfg.alias)  # a bad set fails here, before Ray starts
        launcher = make_launcher(run_cfg)
        try:
            (call,) = launcher.samplers([(uri, prefix, cfg.alias)])
            labels = [d for d in range(10) for _ in range(10)]
            samples = launcher.get(call("sample", (labels, dict(run_cfg.sample.__dict__), run_cfg.seed)))
        finally:
            launcher.shutdown()
        import torch

        out = Path(cfg.out or Path(run_cfg.output_dir) / f"samples-{cfg.alias}.png")
        save_grid(torch.from_numpy(samples), out, columns=10)
        run_id = registry_versions(uri, prefix, cfg.alias)[0].run_id
        Tracker(uri, run_cfg.mlflow.experiment or run_cfg.name, artifact_location(uri)).log_artifact(run_id, out, f"samples/{cfg.alias}")
        print(f"{out} (logged to MLflow run {run_id})")
    except USER_ERRORS as e:
        fail(e)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
