"""Tracking behind one small interface, :class:`Tracker`: runs, metrics, artifacts, the model registry.

:class:`MlflowTracker` is the real one; :class:`NullTracker` keeps everything in memory (fake run
ids and versions) for in-process runs and tests. With MLflow, the coordinator is the only writer
(a sqlite store does not take concurrent writers): a parent run per training run, a child run per
block, and on completion each finished block registered as a new version of ``<name>-block<b>``,
tagged and aliased. A registered block is an MLflow
pyfunc model whose artifact is the block's safetensors export, so
``mlflow.pyfunc.load_model("models:/<name>-block<b>@champion").unwrap_python_model().net`` is
the trained network (the model is logged as code, ``pyfunc_block.py``; nothing is pickled).
"""

from __future__ import annotations

import json
import time
import urllib.request
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import mlflow
import numpy as np
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from dblocks.errors import one_line
from worker.redaction import redact, redact_config


class TrackingError(RuntimeError):
    pass


PYFUNC_CODE = Path(__file__).with_name("pyfunc_block.py")  # the registered model, as code (no pickle)


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (OSError, ValueError) as e:
            raise TrackingError(
                f"mlflow.tracking_uri={redact(uri)}: cannot reach the tracking server ({redact(one_line(e))}); "
                "start it or fix the URI"
            ) from None


class Tracker(Protocol):
    uri: str

    def start_run(self, name: str, tags: dict, parent_id: str | None = None, system_metrics: bool = False) -> str: ...
    def reopen(self, run_id: str, system_metrics: bool = False) -> None: ...
    def log_params(self, run_id: str, params: dict) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None: ...
    def log_dict(self, run_id: str, obj: dict, path: str) -> None: ...
    def log_artifact(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None: ...
    def end(self, run_id: str, ok: bool) -> None: ...
    def register_block(self, run_id: str, export_file: Path, name: str, tags: dict, alias: str) -> str: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...


class NullTracker:
    """Tracks nothing anywhere: run ids ``null-<n>``, versions counting from 1; what was logged
    stays readable in memory (``metrics``, ``params``, ``aliases``) for tests."""

    uri = "null://"

    def __init__(self) -> None:
        self.runs: dict[str, dict] = {}  # run id -> {"name", "tags", "status"}
        self.params: dict[str, dict] = defaultdict(dict)
        self.metrics: dict[str, list[tuple[dict, int]]] = defaultdict(list)  # run id -> [(metrics, step)]
        self.versions: dict[str, list[dict]] = defaultdict(list)  # registered name -> tags of each version
        self.aliases: dict[tuple[str, str], str] = {}  # (name, alias) -> version

    def start_run(self, name: str, tags: dict, parent_id: str | None = None, system_metrics: bool = False) -> str:
        run_id = f"null-{len(self.runs)}"
        self.runs[run_id] = {"name": name, "tags": dict(tags), "parent": parent_id, "status": "RUNNING"}
        return run_id

    def reopen(self, run_id: str, system_metrics: bool = False) -> None:
        self.runs.setdefault(run_id, {"name": run_id, "tags": {}, "parent": None})["status"] = "RUNNING"

    def log_params(self, run_id: str, params: dict) -> None:
        self.params[run_id].update(_flatten(redact_config(params)))

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        self.metrics[run_id].append((dict(metrics), step))

    def log_dict(self, run_id: str, obj: dict, path: str) -> None:
        pass

    def log_artifact(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, run_id: str, ok: bool) -> None:
        self.reopen(run_id)
        self.runs[run_id]["status"] = "FINISHED" if ok else "FAILED"

    def register_block(self, run_id: str, export_file: Path, name: str, tags: dict, alias: str) -> str:
        self.versions[name].append({k: str(v) for k, v in tags.items()})
        version = str(len(self.versions[name]))
        self.set_alias(name, alias, version)
        return version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[(name, alias)] = version


class MlflowTracker:
    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        check_reachable(tracking_uri)
        self.uri = tracking_uri
        try:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
            self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location)
            )
        except Exception as e:  # noqa: BLE001  (an unknown scheme, a malformed URI, a store that cannot open)
            what = redact(one_line(e))[:300]
            raise TrackingError(
                f"mlflow.tracking_uri={redact(tracking_uri)}: cannot open the tracking store ({type(e).__name__}: "
                f"{what}); use sqlite:///<path>.db or http(s)://host:port, or leave it unset"
            ) from None
        self._monitor: SystemMetricsMonitor | None = None

    # ---- runs -----------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict, parent_id: str | None = None, system_metrics: bool = False) -> str:
        tags = {k: redact(str(v)) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if system_metrics:
            self.system_metrics(run.info.run_id)
        return run.info.run_id

    def reopen(self, run_id: str, system_metrics: bool = False) -> None:
        self.client.update_run(run_id, status="RUNNING")
        if system_metrics:
            self.system_metrics(run_id)

    def system_metrics(self, run_id: str) -> None:
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=self.uri, resume_logging=True)
        self._monitor.start()

    def log_params(self, run_id: str, params: dict) -> None:
        flat = _flatten(redact_config(params))
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            try:
                self.client.log_batch(run_id, params=items[i : i + 100])
            except MlflowException:  # params are immutable: already logged by the run we resume
                pass

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        now = int(1000 * time.time())
        ms = [
            mlflow.entities.Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and np.isfinite(v)
        ]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def log_dict(self, run_id: str, obj: dict, path: str) -> None:
        self.client.log_dict(run_id, redact_config(obj), path)

    def log_artifact(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local), artifact_path)

    def end(self, run_id: str, ok: bool) -> None:
        if self._monitor is not None and self._monitor._run_id == run_id:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))

    # ---- registry ---------------------------------------------------------------------------
    def register_block(self, run_id: str, export_file: Path, name: str, tags: dict, alias: str) -> str:
        """Log ``export_file`` as a pyfunc model of run ``run_id``, register it as a new version
        of ``name`` with ``tags``, and point ``alias`` at it. Returns the version."""
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*")  # predict takes a dict of arrays
            info = mlflow.pyfunc.log_model(
                name="block",
                python_model=str(PYFUNC_CODE),
                artifacts={"block": str(export_file)},
                pip_requirements=["torch", "safetensors", "numpy"],
            )
        mv = mlflow.register_model(info.model_uri, name, tags={k: redact(str(v)) for k, v in tags.items()})
        self.client.set_registered_model_alias(name, alias, mv.version)
        return mv.version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def registry_versions(tracking_uri: str, prefix: str, alias: str) -> list:
    """Versions ``<prefix>-block0..`` behind ``alias``, in block order; stops at the first missing
    name and checks the set against block 0's ``num_blocks`` tag (the sampler validates the rest)."""
    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    versions = []
    while True:
        try:
            versions.append(client.get_model_version_by_alias(f"{prefix}-block{len(versions)}", alias))
        except MlflowException:
            break
    return versions


def load_registered_block(tracking_uri: str, name: str, alias: str):
    """(network, spec, metadata) of ``models:/<name>@<alias>``."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    # suppress_warnings: skip MLflow's scan of every installed package's metadata against the
    # model's pip requirements (seconds per block, minutes on a loaded machine); the blocks are ours.
    model = mlflow.pyfunc.load_model(f"models:/{name}@{alias}", suppress_warnings=True).unwrap_python_model()
    return model.net, model.spec, model.meta
