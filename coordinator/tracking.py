"""Tracking behind one small interface, :class:`Tracker`: runs, metrics, artifacts, the model registry.

:class:`MlflowTracker` is the real one; :class:`NullTracker` keeps everything in memory (fake run
ids and versions) for in-process runs and tests. With MLflow, the coordinator is the only writer
(a sqlite store does not take concurrent writers): a parent run per training run, a child run per
block, and on completion each finished block registered as a new version of ``<name>-block<b>``,
tagged and aliased. A registered block is an MLflow
pyfunc model whose artifact is the block's safetensors export, so
``mlflow.pyfunc.load_model("models:/<name>-block<b>@champion").unwrap_python_model().net`` is
the trained network (the model is logged as code, ``pyfunc_block.py``; nothing is pickled).

A run wraps its tracker in ``coordinator/forwarding.py``'s ``QueuedTracker``: every call then goes
through one background thread, so MLflow being slow or down never holds up training. System
metrics come from MLflow's own monitors (cpu, memory, disk, network, GPU), sampled by
:class:`SystemMetrics` and sent through ``system_sink`` -- the queue's ``log_metrics`` there -- so
no sample is lost while the server is down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Callable, Protocol

import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from dblocks.build import export_arrays
from dblocks.checkpoint import load_meta
from dblocks.errors import one_line
from dblocks.families.base import Array
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
    experiment_id: str  # the experiment the runs are in (for links to the UI)

    def start_run(self, name: str, tags: dict, parent_id: str | None = None, system_metrics: bool = False) -> str: ...
    def reopen(self, run_id: str, system_metrics: bool = False) -> None: ...
    def log_params(self, run_id: str, params: dict) -> None: ...
    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: float | None = None) -> None: ...
    def log_dict(self, run_id: str, obj: dict, path: str) -> None: ...
    def log_artifact(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None: ...
    def end(self, run_id: str, ok: bool, killed: bool = False) -> None:
        """Mark the run FINISHED (ok), FAILED, or KILLED (interrupted; it can be resumed)."""

    def register_block(
        self, run_id: str, export_file: Path, name: str, tags: dict, alias: str, description: str = ""
    ) -> str: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def when_delivered(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once everything logged before has reached the tracker (at once when it logs synchronously)."""


def unreachable(e: BaseException) -> bool:
    """An outage (connection refused or reset, a timeout, a 5xx answer), not a request MLflow refuses."""
    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500
    return isinstance(e, OSError)  # requests' and urllib3's errors are OSErrors


# MLflow 3 opens an experiment on its GenAI page unless told it holds model training: the tag its
# UI's experiment-type selector writes. MLflow 3.17's UI still follows the browser's remembered
# choice, so links add ``?workflowType=machine_learning`` (``runs_url``).
TRAINING_EXPERIMENT = ("mlflow.experimentKind", "custom_model_development")


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI at ``base``, in its model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class NullTracker:
    """Tracks nothing anywhere: run ids ``null-<n>``, versions counting from 1; what was logged
    stays readable in memory (``metrics``, ``params``, ``aliases``) for tests."""

    uri = "null://"
    experiment_id = "0"
    system_sink = None  # no system metrics

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

    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: float | None = None) -> None:
        self.metrics[run_id].append((dict(metrics), step))

    def log_dict(self, run_id: str, obj: dict, path: str) -> None:
        pass

    def log_artifact(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, run_id: str, ok: bool, killed: bool = False) -> None:
        self.reopen(run_id)
        self.runs[run_id]["status"] = "KILLED" if killed else "FINISHED" if ok else "FAILED"

    def register_block(
        self, run_id: str, export_file: Path, name: str, tags: dict, alias: str, description: str = ""
    ) -> str:
        self.versions[name].append({k: str(v) for k, v in tags.items()} | {"description": description})
        version = str(len(self.versions[name]))
        self.set_alias(name, alias, version)
        return version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[(name, alias)] = version

    def when_delivered(self, fn: Callable[[], None]) -> None:
        fn()


class SystemMetrics(SystemMetricsMonitor):
    """MLflow's system-metrics monitor with its loop replaced: sample every ``interval`` seconds and
    hand each point to ``sink(run_id, metrics, step, timestamp)``, with no MLflow call in between
    (MLflow's loop stops for good at the first failed ``get_run``, losing everything after an outage)."""

    def __init__(self, run_id: str, sink: Callable, tracking_uri: str, resume: bool, interval: float = 5.0):
        super().__init__(run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=tracking_uri)
        self.sink = sink

    def monitor(self) -> None:
        while not self._shutdown_event.is_set():
            self.collect_metrics()
            if self._shutdown_event.wait(self.sampling_interval):
                return
            self.publish_metrics(self.aggregate_metrics())

    def publish_metrics(self, metrics: dict) -> None:
        prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
        self.sink(self._run_id, {prefix + k: v for k, v in metrics.items()}, self._logging_step, time.time())
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()

    def finish(self) -> None:
        self._shutdown_event.set()
        if self._process is not None and self._process is not threading.current_thread():
            self._process.join()


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
            self.client.set_experiment_tag(self.experiment_id, *TRAINING_EXPERIMENT)
        except Exception as e:  # noqa: BLE001  (an unknown scheme, a malformed URI, a store that cannot open)
            what = redact(one_line(e))[:300]
            raise TrackingError(
                f"mlflow.tracking_uri={redact(tracking_uri)}: cannot open the tracking store ({type(e).__name__}: "
                f"{what}); use sqlite:///<path>.db or http(s)://host:port, or leave it unset"
            ) from None
        self._monitor: SystemMetrics | None = None
        self.system_sink: Callable = self.log_metrics  # where system metrics go (QueuedTracker: its queue)

    # ---- runs -----------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict, parent_id: str | None = None, system_metrics: bool = False) -> str:
        tags = {k: redact(str(v)) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if system_metrics:
            self.system_metrics(run.info.run_id, resume=False)
        return run.info.run_id

    def reopen(self, run_id: str, system_metrics: bool = False) -> None:
        self.client.update_run(run_id, status="RUNNING")
        if system_metrics:
            self.system_metrics(run_id, resume=True)

    def system_metrics(self, run_id: str, resume: bool) -> None:
        """Sample system metrics into ``run_id`` until it ends (``resume``: after its last logged step)."""
        if self._monitor is not None:
            self._monitor.finish()
        self._monitor = SystemMetrics(run_id, lambda *point: self.system_sink(*point), self.uri, resume)
        self._monitor.start()

    def log_params(self, run_id: str, params: dict) -> None:
        flat = _flatten(redact_config(params))
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            try:
                self.client.log_batch(run_id, params=items[i : i + 100])
            except MlflowException:  # params are immutable: already logged by the run we resume
                pass

    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: float | None = None) -> None:
        """``timestamp`` (seconds; default now): when the point was measured. Sending the same point
        (same values, step and timestamp) again adds nothing to a SQL store's history."""
        now = int(1000 * (time.time() if timestamp is None else timestamp))
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

    def end(self, run_id: str, ok: bool, killed: bool = False) -> None:
        if self._monitor is not None and self._monitor._run_id == run_id:
            self._monitor.finish()
            self._monitor = None
        status = RunStatus.KILLED if killed else RunStatus.FINISHED if ok else RunStatus.FAILED
        self.client.set_terminated(run_id, RunStatus.to_string(status))

    def when_delivered(self, fn: Callable[[], None]) -> None:
        fn()

    # ---- registry ---------------------------------------------------------------------------
    def register_block(
        self, run_id: str, export_file: Path, name: str, tags: dict, alias: str, description: str = ""
    ) -> str:
        """Log ``export_file`` as a pyfunc model of run ``run_id`` (the logged model named ``name``),
        register it as a new version of ``name`` with ``tags`` and ``description`` (also the registered
        model's), and point ``alias`` at it. Returns the version. A version
        ``run_id`` already registered (an attempt cut off by an outage after that point) is reused."""
        earlier = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if earlier:
            version = max(earlier, key=lambda v: int(v.version)).version
            self.client.set_registered_model_alias(name, alias, version)
            return version
        signature, example = block_signature(export_file)
        with mlflow.start_run(run_id=run_id), _unsigned(signature is None):
            info = mlflow.pyfunc.log_model(
                name=name,  # the logged model says which block it is
                python_model=str(PYFUNC_CODE),
                artifacts={"block": str(export_file)},
                pip_requirements=["torch", "safetensors", "numpy"],
                signature=signature,
                input_example=example,
            )
        mv = mlflow.register_model(info.model_uri, name, tags={k: redact(str(v)) for k, v in tags.items()})
        if description:
            self.client.update_model_version(name, mv.version, description=redact(description))
            self.client.update_registered_model(name, description=redact(description))
        self.client.set_registered_model_alias(name, alias, mv.version)
        return mv.version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


def block_signature(export_file: Path) -> tuple[ModelSignature | None, dict | None]:
    """The registered model's signature (named tensors; -1: any length) and an input example of 2 rows,
    from the export's ``Family.predict_arrays``; (None, None) for a baseline that is not a denoiser."""
    arrays = export_arrays(load_meta(export_file))
    if arrays is None:
        return None, None
    inputs, output = arrays

    def spec(a: Array, name: str | None = None) -> TensorSpec:
        dtype = torch.empty(0, dtype=a.dtype).numpy().dtype
        return TensorSpec(dtype, tuple(-1 if n is None else n for n in a.shape), name)

    signature = ModelSignature(Schema([spec(a, k) for k, a in inputs.items()]), Schema([spec(output)]))
    return signature, {k: a.example().numpy() for k, a in inputs.items()}


@contextlib.contextmanager
def _unsigned(on: bool):
    """A model logged without a signature on purpose (a baseline that is not a denoiser): MLflow's
    warning that it could not infer one is dropped while it is logged."""

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to infer model signature")

    target = logging.getLogger("mlflow.pyfunc")
    if on:
        target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


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
