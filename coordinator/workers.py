"""Where the block workers and samplers run: Ray actors, or this process (``workers.backend``).

A worker group is what the controller (coordinator/controller.py) drives: ``start(job)`` starts a
block's worker (it resumes from its checkpoint), ``stop(job)`` ends it, ``running()`` is the jobs
it runs now, ``poll(timeout)`` returns the jobs that finished since the last call as
``(job, result, error)``, ``samplers(specs)`` gives one Sampler per registered set (callers
``call(method, args)``, resolved with ``get``), ``shutdown()`` ends everything. Ray is applied at
launch, ``ray.remote(BlockWorker)``: the worker class knows nothing about Ray.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Callable, Protocol

from dblocks.config import RunConfig
from worker.block_worker import BlockWorker
from worker.record import JobId
from worker.store import RunStore

from .sampler import Sampler, block_set

Outcome = tuple[JobId, "dict | None", "BaseException | None"]  # (job, its result, or the error it raised)
Caller = Callable[[str, tuple], object]  # call(method, args) on a sampler; resolve with ``get``


class LaunchError(RuntimeError):
    pass


class WorkerGroup(Protocol):
    def attach(self, store: RunStore, run_id: str) -> None: ...
    def start(self, job: JobId) -> None: ...
    def stop(self, job: JobId) -> None: ...
    def running(self) -> set[JobId]: ...
    def unschedulable(self, job: JobId) -> str | None: ...
    def poll(self, timeout: float) -> list[Outcome]: ...
    def samplers(self, specs: list[tuple[str, str, str]]) -> list[Caller]: ...
    def get(self, refs): ...
    def shutdown(self) -> None: ...


# Ray binds a local instance's GCS, raylet, workers and agents to the node's address, on all
# interfaces; with this variable at 0 it uses 127.0.0.1, as on a laptop (ray._private.ray_constants).
# Set it to 1 in the environment to opt out.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only(ray) -> None:
    """Make the local Ray about to start listen on 127.0.0.1 only (unless LOOPBACK_ENV says otherwise).
    The variable is read when ``ray`` is imported: set it for the processes Ray spawns, and set the
    constant Ray already read in this one."""
    if os.environ.setdefault(LOOPBACK_ENV, "0") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def check_ray_address(address: str) -> None:
    """Fail fast, in one line, when a Ray address is not listening (ray.init would retry for a minute)."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise LaunchError(f"ray.address={address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except OSError as e:
        raise LaunchError(
            f"ray.address={address}: nothing listens there ({e}); start `ray start --head` or fix the address"
        ) from None


def unschedulable(w, have: dict) -> str | None:
    """What one block's actor asks for (``workers.*``) that a fixed cluster with resources ``have``
    can never give it, as a one-line message naming the setting; None if it fits."""
    asks = {"CPU": ("workers.num_cpus", w.num_cpus, "ray.num_cpus"), "GPU": ("workers.num_gpus", w.num_gpus, None)}
    asks |= {name: (f"workers.resources.{name}", n, f"ray.resources.{name}") for name, n in w.resources.items()}
    for resource, (key, n, grow) in asks.items():
        if n > have.get(resource, 0):
            fix = (
                f"lower {key}"
                + (f" or raise {grow}" if grow else "")
                + ("; workers.num_gpus=0 runs on the CPU" if resource == "GPU" else "")
            )
            return f"{key}={n:g}: this machine's Ray has {have.get(resource, 0):g} {resource}; {fix}"
    return None


class RayWorkers:
    """One Ray actor per block (``workers.num_cpus``, ``num_gpus``, ``resources``); a restarted
    block gets a fresh actor (Ray's own restarts are off: the controller decides)."""

    def __init__(self, cfg: RunConfig, temp_dir: str | None = None):
        import ray

        self.ray, self.cfg = ray, cfg
        self.store_url = self.run_id = ""  # set by attach() once the run exists
        env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
        if cfg.ray.address:
            if cfg.ray.address != "auto":
                check_ray_address(cfg.ray.address)
            ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=False)
        elif os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: join the job's cluster
            ray.init(log_to_driver=False)
        else:  # logical CPUs: enough for every block's actor at once (they share the cores)
            loopback_only(ray)  # a one-machine Ray: its services listen on 127.0.0.1
            jobs = cfg.blocks.num + (1 if cfg.baseline and cfg.blocks.num > 1 else 0)
            cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(jobs * cfg.workers.num_cpus))
            ray.init(
                address="local",
                num_cpus=cpus,
                num_gpus=cfg.ray.num_gpus,
                resources=cfg.ray.resources or None,
                include_dashboard=False,
                runtime_env=env,
                log_to_driver=False,
                _temp_dir=temp_dir,
            )
            short = unschedulable(cfg.workers, ray.cluster_resources())
            if short:  # a local Ray never grows: the actors would wait forever
                ray.shutdown()
                raise LaunchError(short)
        w = cfg.workers
        self._worker_cls = ray.remote(
            num_cpus=w.num_cpus,
            num_gpus=w.num_gpus,
            resources=w.resources or None,
            max_restarts=0,
            max_task_retries=0,  # the controller restarts a failed block in a fresh actor
        )(BlockWorker)
        self.actors: dict[JobId, object] = {}
        self.attempts: dict[JobId, int] = {}
        self.refs: dict[object, JobId] = {}

    def attach(self, store: RunStore, run_id: str) -> None:
        """Actors reach the run's store by its URL (an in-memory store cannot be shared with them)."""
        if store.url.startswith("memory://"):
            raise LaunchError(
                f"redis.url={store.url}: an in-memory store lives in this process only; "
                "use workers.backend=inline or a redis:// URL"
            )
        self.store_url, self.run_id = store.url, run_id

    def actor_name(self, job: JobId) -> str:
        return f"dblocks-{self.run_id}-{job.model}-{job.index}-{self.attempts[job]}"

    def start(self, job: JobId) -> None:
        """Start ``job`` in a fresh actor (a previous one is killed first); it resumes from its checkpoint."""
        self.stop(job)
        self.attempts[job] = self.attempts.get(job, -1) + 1
        self.actors[job] = self._worker_cls.options(name=self.actor_name(job), namespace="dblocks").remote(
            self.store_url, self.run_id, job, consumer=f"actor-{job}"
        )
        self.refs[self.actors[job].run.remote()] = job

    def stop(self, job: JobId) -> None:
        """Kill ``job``'s actor; its pending result is dropped (poll will not report it)."""
        self.refs = {ref: j for ref, j in self.refs.items() if j != job}
        if job in self.actors:
            self.ray.kill(self.actors.pop(job), no_restart=True)

    def running(self) -> set[JobId]:
        return set(self.refs.values())

    def unschedulable(self, job: JobId) -> str | None:
        """What ``job``'s actor asks for beyond the cluster's resources now (one line), else None."""
        return unschedulable(self.cfg.workers, self.ray.cluster_resources()) if job in self.actors else None

    def poll(self, timeout: float) -> list[Outcome]:
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
                out.append((job, None, e))  # its actor is killed by the restart, or at shutdown
        return out

    def samplers(self, specs: list[tuple[str, str, str]]) -> list[Caller]:
        """One sampler actor per (tracking_uri, prefix, alias)."""
        for spec in specs:
            block_set(*spec)  # refuse a bad set here, in one line, not inside an actor
        w = self.cfg.workers
        actor_cls = self.ray.remote(num_cpus=min(1.0, w.num_cpus), num_gpus=w.num_gpus)(Sampler)
        actors = [actor_cls.remote(*s, self.cfg.train.device) for s in specs]  # on its GPU, if it has one
        return [lambda m, a, _x=x: getattr(_x, m).remote(*a) for x in actors]

    def get(self, refs):
        return self.ray.get(refs)

    def shutdown(self) -> None:
        for a in self.actors.values():
            self.ray.kill(a, no_restart=True)
        self.ray.shutdown()  # disconnects; stops the cluster only if ray.init started it


class InlineWorkers:
    """Everything in this process, inside ``poll``: the same controller without Ray (tests, the
    standalone single-block worker). While other jobs wait, each poll gives one job a turn of
    ``TURN_UNITS`` units, up to its next checkpoint (``BlockWorker(turn_units=...)``), then queues it
    behind them, so the blocks advance together as they do on a cluster; a job alone runs to its end.
    A worker runs only inside ``poll``, so between steps none is running and none can go stale."""

    TURN_UNITS = 1

    def __init__(self, cfg: RunConfig | None = None, temp_dir: str | None = None):
        self.store: RunStore | None = None
        self.run_id = ""
        self.queue: list[JobId] = []
        self.device = cfg.train.device if cfg is not None else "cpu"  # the samplers'

    def attach(self, store: RunStore, run_id: str) -> None:
        self.store, self.run_id = store, run_id  # the object itself: a MemoryStore works too

    def start(self, job: JobId) -> None:
        self.stop(job)
        self.queue.append(job)

    def stop(self, job: JobId) -> None:
        self.queue = [j for j in self.queue if j != job]

    def running(self) -> set[JobId]:
        return set()

    def unschedulable(self, job: JobId) -> str | None:
        return None  # this process runs every job

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.queue:
            return []
        job = self.queue.pop(0)
        turn = self.TURN_UNITS if self.queue else 0
        try:
            result = BlockWorker(self.store, self.run_id, job, consumer=f"inline-{job}", turn_units=turn).run()
        except Exception as e:
            return [(job, None, e)]
        if result is None:  # its turn is over: behind the others
            self.queue.append(job)
            return []
        return [(job, result, None)]

    def samplers(self, specs: list[tuple[str, str, str]]) -> list[Caller]:
        objs = [Sampler(*s, self.device) for s in specs]
        return [lambda m, a, _x=x: getattr(_x, m)(*a) for x in objs]

    def get(self, values):
        return values

    def shutdown(self) -> None:
        self.queue.clear()


BACKENDS: dict[str, type] = {"ray": RayWorkers, "inline": InlineWorkers}


def make_workers(cfg: RunConfig, temp_dir: str | None = None) -> WorkerGroup:
    """The ``workers.backend`` group (``attach`` it to a run before starting jobs)."""
    return BACKENDS[cfg.workers.backend](cfg, temp_dir)
