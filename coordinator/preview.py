"""Previews while the blocks train (``eval.every`` work units): watch quality rise in MLflow.

Each worker exports its EMA weights every ``eval.every`` units (``worker/block_worker.py``,
``preview_rel``) and reports ``preview_unit``. When every job of a model (the B blocks, or the
end-to-end baseline) has reached the next multiple of ``eval.every``, the coordinator chains their
latest exports and evaluates them with the family's own metrics -- on a background thread when
the blocks train in other processes (Ray), so the controller loop never waits; in this process
(inline workers) between two turns of the blocks, so the preview never shares torch's global RNG with a
block being built. The floats go to the parent run as ``preview/<model>/<metric>`` at
step = that unit, the samples as ``samples/during/<model>/unit-<n>.png`` (images) or ``.txt`` (text)
in the parent run and under ``<output_dir>/samples/during``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from dblocks.build import block_from_export
from dblocks.checkpoint import load_checkpoint
from dblocks.config import Backend, RunConfig
from worker.block_worker import preview_rel
from worker.record import JobId, Manifest
from worker.storage import Storage

from .report import show_samples

log = logging.getLogger(__name__)


class Previewer:
    """``update(progress)`` once per controller step; ``close()`` waits for the preview in flight."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, storage: Storage, tracker, data, out: Path):
        self.cfg, self.manifest, self.storage, self.tracker, self.data = cfg, manifest, storage, tracker, data
        self.out = out / "samples" / "during"
        self.every = cfg.eval.every
        self.background = cfg.workers.backend == Backend.ray  # else the blocks train in this process
        self.shown = dict.fromkeys(manifest.models, 0)  # per model: the last unit previewed
        self._thread: threading.Thread | None = None
        self.done: list[tuple[str, int]] = []  # (model, unit) previews logged, in order

    def update(self, progress: dict[JobId, dict]) -> None:
        if not self.every or (self._thread is not None and self._thread.is_alive()):
            return
        for model in self.manifest.models:
            jobs = [j.id for j in self.manifest.jobs_of(model)]
            if any(j not in progress for j in jobs):
                continue
            reached = min(int(progress[j].get("preview_unit", 0) or 0) for j in jobs)
            unit = reached - reached % self.every
            if unit > self.shown[model]:
                self.shown[model] = unit
                if not self.background:
                    self._preview(model, jobs, unit)
                    continue
                self._thread = threading.Thread(target=self._preview, args=(model, jobs, unit), daemon=True)
                self._thread.start()
                return  # one at a time: the next model's turn comes at a later step

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _preview(self, model: str, jobs: list[JobId], unit: int) -> None:
        try:
            nets, plan = [], []
            with tempfile.TemporaryDirectory() as tmp:
                for job in jobs:
                    local = self.storage.get_file(preview_rel(self.manifest.run_id, job), Path(tmp) / f"{job.index}")
                    net, spec = block_from_export(*load_checkpoint(local))
                    nets.append(net)
                    plan.append(spec)
            res = self.cfg.family.evaluate(nets, plan, self.cfg, self.data, baseline=jobs[0].baseline)
            parent = self.manifest.parent_run
            floats = {f"preview/{model}/{k}": v for k, v in res.items() if isinstance(v, float)}
            self.tracker.log_metrics(parent, floats, step=unit)
            shown = show_samples(self.cfg, res, self.out / model, f"unit-{unit}.png", f"unit-{unit}.txt")
            if shown is not None:
                self.tracker.log_artifact(parent, shown, f"samples/during/{model}")
            self.done.append((model, unit))
            log.info("preview of %s at unit %d: %s", model, unit, shown or ", ".join(sorted(floats)))
        except Exception as e:  # noqa: BLE001  (a preview never fails the run: it is only a view)
            log.warning("preview of %s at unit %d failed: %s", model, unit, str(e).splitlines()[0] if str(e) else e)
