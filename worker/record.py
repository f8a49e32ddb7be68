"""The run record: typed, JSON round-trip, the one shape every process reads.

A run has jobs; a job is one block of one model: ``JobId("blocks", 1)`` (DiffusionBlocks block 1)
or ``JobId("e2e", 0)`` (the end-to-end baseline), written ``blocks/1`` / ``e2e/0`` in Redis keys,
logs and MLflow run names. The :class:`Manifest` is written once when a run starts (and updated
as blocks are registered); workers read it to know what to train.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from dblocks.plan import BlockSpec
from dblocks.units import Shard

Model = Literal["blocks", "e2e"]
MODEL_NAMES: dict[str, str] = {"blocks": "DiffusionBlocks", "e2e": "end-to-end"}


@dataclass(frozen=True, order=True)
class JobId:
    model: Model  # blocks: a DiffusionBlocks block; e2e: the end-to-end baseline
    index: int

    def __str__(self) -> str:
        return f"{self.model}/{self.index}"

    @classmethod
    def parse(cls, text: str) -> "JobId":
        model, sep, index = str(text).partition("/")
        if not sep or model not in MODEL_NAMES or not index.isdigit():
            raise ValueError(f"{text!r}: a job is blocks/<index> or e2e/<index>")
        return cls(model, int(index))  # type: ignore[arg-type]

    @property
    def baseline(self) -> bool:
        return self.model == "e2e"


@dataclass(frozen=True)
class Job:
    id: JobId
    spec: BlockSpec
    plan_hash: str  # what the blocks of one plan agree on (dblocks.plan.plan_hash)
    units: int  # work units in its queue
    registered_model: str  # MLflow registered model name, <name>[-e2e]-block<index>
    mlflow_run: str  # the job's MLflow child run id
    external: bool = False  # left to `python -m worker` instead of a coordinator-started worker

    def to_dict(self) -> dict:
        return {**asdict(self), "id": str(self.id)}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(**{**d, "id": JobId.parse(d["id"]), "spec": BlockSpec(**d["spec"])})


@dataclass
class Manifest:
    run_id: str
    name: str
    created: float
    config: dict  # the RunConfig as a plain dict (worker.config.load_run_config reads it back)
    storage: str  # storage root (local path or pyarrow.fs URI)
    shards: list[Shard]
    jobs: dict[JobId, Job]
    tracking_uri: str
    parent_run: str  # the MLflow parent run id
    registered: dict[JobId, str] = field(default_factory=dict)  # job -> registered model version

    def jobs_of(self, model: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.id.model == model]

    @property
    def models(self) -> list[str]:
        """The models of this run in display order (blocks, then e2e)."""
        return [m for m in MODEL_NAMES if any(j.model == m for j in self.jobs)]

    def job(self, job_id: JobId | str) -> Job:
        key = job_id if isinstance(job_id, JobId) else JobId.parse(job_id)
        if key not in self.jobs:
            raise KeyError(f"run {self.run_id} has no {key} (it has {', '.join(map(str, self.jobs))})")
        return self.jobs[key]

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: it cannot key a dict by JobId
        d["shards"] = [asdict(s) for s in self.shards]
        d["jobs"] = [j.to_dict() for j in self.jobs.values()]
        d["registered"] = {str(k): v for k, v in self.registered.items()}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        jobs = [Job.from_dict(j) for j in d.pop("jobs")]
        return cls(
            **{k: v for k, v in d.items() if k not in ("shards", "registered")},
            shards=[Shard(**s) for s in d["shards"]],
            jobs={j.id: j for j in jobs},
            registered={JobId.parse(k): v for k, v in d["registered"].items()},
        )
