"""Where the block workers and samplers run: Ray actors, or this process (``workers.backend``).

Both launchers have the same four methods: ``submit(job)`` starts a block's worker,
``poll(timeout)`` returns the jobs that finished since the last call as (job, result, error),
``sampler(...)`` gives a Sampler (an actor, or a plain object) and ``shutdown()``. Ray is applied
at launch: ``ray.remote(BlockWorker)``; the worker class knows nothing about Ray.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Callable

from dblocks.config import RunConfig
from worker.block_worker import BlockWorker

from .sampler import Sampler, block_set


class LaunchError(RuntimeError):
    pass


def check_ray_address(address: str) -> None:
    """Fail fast, in one line, when a Ray address is not listening (ray.init would retry for a minute)."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise LaunchError(f"ray.address={address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except OSError as e:
        raise LaunchError(f"ray.address={address}: nothing listens there ({e}); start `ray start --head` or fix the address") from None


class RayLauncher:
    def __init__(self, cfg: RunConfig, temp_dir: str | None = None):
        import ray

        self.ray, self.cfg = ray, cfg
        self.redis_url = self.run_id = ""  # set by attach() once the run exists
        env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
        if cfg.ray.address:
            if cfg.ray.address != "auto":
                check_ray_address(cfg.ray.address)
            ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=False)
        elif os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: join the job's cluster
            ray.init(log_to_driver=False)
        else:  # logical CPUs: enough for every block's actor at once (they share the cores)
            jobs = cfg.blocks.num + (1 if cfg.baseline and cfg.blocks.num > 1 else 0)
            cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(jobs * cfg.workers.num_cpus))
            ray.init(address="local", num_cpus=cpus, num_gpus=cfg.ray.num_gpus, resources=cfg.ray.resources or None,
                     include_dashboard=False, runtime_env=env,
                     log_to_driver=False, _temp_dir=temp_dir)  # fmt: skip
        w = cfg.workers
        self._worker_cls = ray.remote(
            num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=w.resources or None,
            max_restarts=0, max_task_retries=0,  # the coordinator restarts a failed block in a fresh actor
        )(BlockWorker)  # fmt: skip
        self.actors: dict[str, object] = {}
        self.attempts: dict[str, int] = {}
        self.refs: dict[object, str] = {}

    def attach(self, redis_url: str, run_id: str) -> None:
        self.redis_url, self.run_id = redis_url, run_id

    def actor_name(self, job: str) -> str:
        return f"dblocks-{self.run_id}-{job.replace('/', '-')}-{self.attempts[job]}"

    def submit(self, job: str) -> None:
        """Start ``job`` in a fresh actor (a failed one is killed first); it resumes from its checkpoint."""
        if job in self.actors:
            self.ray.kill(self.actors.pop(job), no_restart=True)
        self.attempts[job] = self.attempts.get(job, -1) + 1
        self.actors[job] = self._worker_cls.options(name=self.actor_name(job), namespace="dblocks").remote(
            self.redis_url, self.run_id, job, consumer=f"actor-{job}"
        )
        self.refs[self.actors[job].run.remote()] = job

    def poll(self, timeout: float) -> list[tuple[str, dict | None, BaseException | None]]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        out = []
        for ref in ready:
            job = self.refs.pop(ref)
            try:
                out.append((job, self.ray.get(ref), None))
                self.ray.kill(self.actors.pop(job), no_restart=True)  # done: free its CPU/GPU
            except Exception as e:  # RayActorError (process died) or the worker's own exception
                out.append((job, None, e))
        return out

    def held_parameters(self, job: str) -> dict:
        return self.ray.get(self.actors[job].held_parameters.remote())

    def samplers(self, specs: list[tuple[str, str, str]]) -> list[Callable[[str, tuple], object]]:
        """One sampler actor per (tracking_uri, prefix, alias); returns callers ``call(method, args)``."""
        for spec in specs:
            block_set(*spec)  # refuse a bad set here, in one line, not inside an actor
        actor_cls = self.ray.remote(num_cpus=min(1.0, self.cfg.workers.num_cpus), num_gpus=self.cfg.workers.num_gpus)(Sampler)
        actors = [actor_cls.remote(*s) for s in specs]
        return [lambda m, a, _x=x: getattr(_x, m).remote(*a) for x in actors]

    def get(self, refs):
        return self.ray.get(refs)

    def shutdown(self) -> None:
        for a in self.actors.values():
            self.ray.kill(a, no_restart=True)
        self.ray.shutdown()  # disconnects; stops the cluster only if ray.init started it


class InlineLauncher:
    """Everything in this process, one block after another: the same coordinator code without Ray
    (unit tests, the standalone single-block worker)."""

    def __init__(self, cfg: RunConfig, temp_dir: str | None = None):
        self.redis_url = self.run_id = ""
        self.queue: list[str] = []
        self.workers: dict[str, BlockWorker] = {}

    def attach(self, redis_url: str, run_id: str) -> None:
        self.redis_url, self.run_id = redis_url, run_id

    def submit(self, job: str) -> None:
        self.queue.append(job)

    def poll(self, timeout: float) -> list[tuple[str, dict | None, BaseException | None]]:
        if not self.queue:
            return []
        job = self.queue.pop(0)
        self.workers[job] = BlockWorker(self.redis_url, self.run_id, job, consumer=f"inline-{job}")
        try:
            return [(job, self.workers[job].run(), None)]
        except Exception as e:
            return [(job, None, e)]

    def held_parameters(self, job: str) -> dict:
        return self.workers[job].held_parameters()

    def samplers(self, specs):
        objs = [Sampler(*s) for s in specs]
        return [lambda m, a, _x=x: getattr(_x, m)(*a) for x in objs]

    def get(self, values):
        return values

    def shutdown(self) -> None:
        pass


def make_launcher(cfg: RunConfig, temp_dir: str | None = None):
    cls = RayLauncher if cfg.workers.backend == "ray" else InlineLauncher
    return cls(cfg, temp_dir)
