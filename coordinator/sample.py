"""``dblocks-sample`` / ``python -m coordinator.sample [alias=champion] [out=grid.png] [experiment=...]``:
load the registered blocks of one alias into a sampler, sample a grid in the data's shape and colour
(10 per class, a row per class, the first 10 classes; unlabelled data: 10 x 10 unconditional samples),
write it as a PNG and log it to the (parent) run that trained the blocks."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dblocks.config import ConfigError
from dblocks.families.dit import sample_labels
from worker.config import check_command_line, config_dir, load_command, register

from .__main__ import fail, setup_logging


@hydra.main(config_path=config_dir(), config_name="sample", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    setup_logging()
    from .errors import USER_ERRORS
    from .report import save_grid
    from .run import artifact_location, default_tracking_uri
    from .sampler import block_set
    from .tracking import MlflowTracker, registry_versions
    from .workers import make_workers

    try:
        run_cfg, args = load_command(cfg)
        family = run_cfg.family
        if not family.baseline_is_denoiser:
            raise ConfigError(
                f"model.family={family.name}: dblocks-sample draws class-conditional image grids from "
                f"denoiser sets; the main job evaluates {family.name} sets from the registry"
            )
        uri, prefix = default_tracking_uri(run_cfg), args["model_prefix"] or run_cfg.name
        block_set(uri, prefix, args["alias"])  # a bad set fails here, before any worker starts
        workers = make_workers(run_cfg)
        try:
            (call,) = workers.samplers([(uri, prefix, args["alias"])])
            num_classes = workers.get(call("info", ()))["num_classes"]
            labels = sample_labels(min(num_classes, 10), 10, null_label=num_classes).tolist()
            samples = workers.get(call("sample", (labels, dataclasses.asdict(run_cfg.sample), run_cfg.seed)))
        finally:
            workers.shutdown()
        import torch

        out = Path(args["out"] or Path(run_cfg.output_dir) / f"samples-{args['alias']}.png")
        save_grid(torch.tensor(samples), out, columns=10)
        block_run = registry_versions(uri, prefix, args["alias"])[0].run_id  # block 0's child run
        tracker = MlflowTracker(uri, run_cfg.mlflow.experiment or run_cfg.name, artifact_location(uri))
        run_id = tracker.client.get_run(block_run).data.tags.get("mlflow.parentRunId", block_run)
        tracker.log_artifact(run_id, out, f"samples/{args['alias']}")
        print(f"{out} (logged to the MLflow run that trained the blocks, {run_id})")
    except USER_ERRORS as e:
        fail(e)


def main() -> None:
    register()
    try:
        check_command_line("sample", sys.argv[1:])  # a wrong type or key: one line, before Hydra's report
    except ConfigError as e:
        fail(e)
    _main()


if __name__ == "__main__":
    main()
