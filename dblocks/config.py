"""Typed run configuration: the one schema. Hydra composes it at the entry points (``worker/config.py``
registers these dataclasses with its ConfigStore); the library only sees these.

The dataclass tree mirrors the Hydra config tree, so a validation error names the config key a
user must fix (``blocks.num``, ``model.size``, ...). The defaults here are the only defaults: the
YAML files under ``configs/`` hold only what an option or experiment changes. Hyperparameters that
depend on batch size are in samples (warm-up, EMA half-life), so they survive a change of batch size.

``model`` is a group with one option per registered family (``model=dit``, ``model=ar``, ...):
:func:`model_options` generates each option from the family's network config, every field an
optional override of the named size (``dblocks/models/sizes.py`` is the only source of its values).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum

import torch

from .errors import ConfigError
from .levels import Levels, SigmaLevels
from .models.sizes import sized
from .noise import PARTITION_KINDS

if typing.TYPE_CHECKING:  # the registry imports the models; the config reads it lazily
    from .families import Family

__all__ = [
    "Backend",
    "BlocksConfig",
    "CeWeighting",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "Grid",
    "MlflowConfig",
    "ModelConfig",
    "Partition",
    "Precision",
    "RayConfig",
    "RedisConfig",
    "RegistryConfig",
    "RunConfig",
    "SampleConfig",
    "StorageConfig",
    "TrainConfig",
    "WorkersConfig",
    "model_class",
    "model_config",
    "model_options",
    "resolve_device",
]

Partition = StrEnum("Partition", PARTITION_KINDS)  # equiprob (Sec. 3.2) | uniform_log (ablation)


class Grid(StrEnum):
    """Inference grid: cdf (DiffusionBlocks, Sec. 3.4), karras (EDM rho=7), auto: cdf if B > 1 else karras."""

    auto = "auto"
    cdf = "cdf"
    karras = "karras"


class Precision(StrEnum):
    """Training precision of a block (dblocks/precision.py): the optimizer state and EMA stay fp32."""

    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16 (CPU and CUDA)
    fp16 = "fp16"  # autocast to float16 with a dynamic loss scale (CUDA only)


class CeWeighting(StrEnum):
    """How the discrete families weight the per-sample cross-entropy by w(sigma) (issue: CE weighting)."""

    per_sample = "per_sample"  # Eq. 6 as written: each sample's CE times its own w(sigma)
    batch_mean = "batch_mean"  # the official code's broadcast: mean(w) * mean(CE) over the batch


class DataSource(StrEnum):
    digits = "digits"  # scikit-learn's load_digits(): 1,797 8x8 images, pixels scaled to [-1, 1]
    text = "text"  # Shakespeare, character level (dblocks/text.py)


class Backend(StrEnum):
    ray = "ray"  # one actor per block
    inline = "inline"  # in the coordinator's process, the blocks taking turns (a unit, up to a checkpoint)


@dataclass(frozen=True)
class BlocksConfig:
    """The block partition (design.md 1.2)."""

    num: int = 3  # B
    gamma: float = 0.05  # overlap of training ranges, in units of each block's log-width (Sec. 3.3)
    partition: str = "equiprob"  # a Partition: equiprob (Sec. 3.2) | uniform_log (ablation)

    def __post_init__(self) -> None:
        if not isinstance(self.num, int) or self.num < 1:
            raise ConfigError(f"blocks.num={self.num}: must be an integer >= 1")
        if self.gamma < 0:
            raise ConfigError(f"blocks.gamma={self.gamma}: must be >= 0 (0 disables overlap)")
        _set_enum(self, "blocks.partition", Partition)


def _set_enum(section, key: str, kind: type[StrEnum]) -> None:
    """Coerce ``section.<name>`` to its enum, naming ``key`` in a one-line error if it is not one of them.

    The schema types these fields as ``str`` (OmegaConf 2.3 has no ``Literal``, and an Enum-typed
    field fails inside Hydra's override parser with a multi-line message before our check runs)."""
    name = key.rsplit(".", 1)[1]
    value = getattr(section, name)
    if value not in set(kind):
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(kind)}")
    object.__setattr__(section, name, kind(value))


# ---- model: one option per registered family -----------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """``model.*``: a family, a named size and (in each family's option) per-key overrides."""

    family: str = "dit"
    size: str = "tiny"  # debug | tiny | ... (the family's size registry)

    def __post_init__(self) -> None:
        option = model_class(self.family)
        if type(self) not in (ModelConfig, option):
            raise ConfigError(
                f"model.family={self.family}: these are the settings of another family; select model={self.family}"
            )
        self.resolved()  # validates size and overrides

    def resolved(self):
        """The family's typed network config (DiTConfig, ViTConfig, ...) for this size and overrides."""
        family = _family(self.family)
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("family", "size")}
        try:
            return sized(family.sizes, self.size, family.name, **overrides)
        except ValueError as e:  # the network config's own checks name their model.* key
            raise ConfigError(str(e)) from None


def _option(family: Family) -> type[ModelConfig]:
    """``model=<family>``: every field of the family's network config as an optional override."""
    hints = typing.get_type_hints(family.config)
    settings = [(f.name, hints[f.name] | None, field(default=None)) for f in fields(family.config)]
    cls = dataclasses.make_dataclass(
        family.config.__name__.replace("Config", "ModelConfig"),
        [("family", str, field(default=family.name)), *settings],
        bases=(ModelConfig,),
        frozen=True,
        namespace={"__doc__": f"``model={family.name}``: {family.config.__name__} settings; None = the size's."},
    )
    cls.__module__ = __name__  # pickled by reference: see __getattr__ below
    return cls


@functools.cache
def model_options() -> dict[str, type[ModelConfig]]:
    """The ``model`` group: family name -> its option class, one per registry entry."""
    from .families import FAMILIES

    return {name: _option(family) for name, family in FAMILIES.items()}


def model_class(family: str) -> type[ModelConfig]:
    options = model_options()
    if family not in options:
        raise ConfigError(f"model.family={family!r}: no such family; choose one of {', '.join(options)}")
    return options[family]


def model_config(d: dict) -> ModelConfig:
    """A ``model`` section as a plain dict (a manifest, an exported block's meta) -> its family's option."""
    cls = model_class(d.get("family", ModelConfig.family))
    known = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ConfigError(f"model.{unknown[0]}={d[unknown[0]]!r}: not a setting of the {cls.family} family; remove it")
    return cls(**d)


def _family(name: str) -> Family:
    from .families import get_family

    return get_family(name)


def __getattr__(name: str):
    """The generated option classes by name (``dblocks.config.DiTModelConfig``), so pickle finds them."""
    if name.endswith("ModelConfig"):
        for cls in model_options().values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- data, training, sampling ---------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """What the blocks train on: a prepared dataset (``dblocks-data``, README "Your own data"), or a
    built-in set that the run prepares into its storage on first use with the same command."""

    source: str = "digits"  # a DataSource (built-in set) used when ``path`` is None; must be the family's
    path: str | None = None  # a prepared dataset: local path or pyarrow.fs URI (its card.json sets the shapes)

    def __post_init__(self) -> None:
        _set_enum(self, "data.source", DataSource)
        if self.path is not None and not str(self.path).strip():
            raise ConfigError("data.path='': give the URI of a prepared dataset, or leave it unset (null)")

    @property
    def name(self) -> str:
        """How messages name the data: ``data.path=<uri>`` or ``data=<source>``."""
        return f"data.path={self.path}" if self.path else f"data={self.source}"


@dataclass(frozen=True)
class TrainConfig:
    """Per-block optimisation; the end-to-end baseline takes as many steps (matched layer-compute)."""

    steps: int = 1500  # optimizer steps per block (and for the end-to-end baseline: matched layer-compute)
    batch_size: int = 128  # samples per step
    lr: float = 1e-3  # AdamW learning rate (after the warm-up)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    grad_clip: float = 1.0  # design.md 1.1: w(sigma) is ~2.5e5 at sigma_min, always clip
    warmup_samples: int = 10_000  # linear learning-rate warm-up, in samples
    ema_halflife_samples: int = 20_000  # half-life of the EMA of the weights (what is exported), in samples
    ema_rampup: float = 0.1  # EMA half-life is at most this fraction of the samples seen (EDM)
    loss_weighting: bool = True  # w(sigma) of Eq. 6; false = the unweighted ablation (sigma families)
    unit_steps: int = 50  # optimizer steps per work unit (the unit of dispatch, ack and resume)
    checkpoint_every: int = 500  # steps; rounded up to a whole work unit
    keep_checkpoints: int = 2  # checkpoints kept per block (the newest + older ones to fall back to); >= 2
    threads: int = 0  # torch threads per worker; 0 = leave torch's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps: resolve_device()
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only): dblocks/precision.py
    compile: bool = False  # torch.compile the block's network (its forward and the loss through it)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward (paper App. G)
    ce_weighting: str = "per_sample"  # discrete families: per_sample w(sigma) (Eq. 6) | batch_mean (official code)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "unit_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.keep_checkpoints < 2:
            keep = self.keep_checkpoints
            raise ConfigError(f"train.keep_checkpoints={keep}: must be >= 2 (to fall back from a corrupt checkpoint)")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: must be > 0")
        if self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip}: must be > 0")
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.device != "auto":
            _parse_device(self.device)
        _set_enum(self, "train.precision", Precision)
        _set_enum(self, "train.ce_weighting", CeWeighting)
        if self.precision == Precision.fp16 and self.device == "cpu":
            raise ConfigError("train.precision=fp16: needs CUDA (GradScaler); on a CPU use bf16 or fp32")


def _parse_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r}: use auto, cpu, cuda, cuda:N or mps") from None


def resolve_device(name: str) -> torch.device:
    """``train.device`` on the machine where the worker runs: ``auto`` is cuda if available, else cpu;
    a device this machine lacks is a one-line config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = _parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name!r}: MPS is not available on this machine; use auto or cpu")
    return device


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50  # grid points (each is one denoiser call)
    guidance: float | None = None  # classifier-free guidance scale; 1 = none; None: 1.5 (1 on unlabelled data)
    per_class: int = 50  # class-conditional samples per class for the metrics
    grid: str = "auto"  # a Grid: auto | cdf | karras

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ConfigError(f"sample.steps={self.steps}: must be >= 2")
        if self.per_class < 1:
            raise ConfigError(f"sample.per_class={self.per_class}: must be >= 1")
        _set_enum(self, "sample.grid", Grid)

    def guidance_scale(self, labelled: bool) -> float:
        """The guidance to sample with: ``guidance``, or 1.5 on labelled data and 1 (none) on unlabelled."""
        if self.guidance is not None:
            return self.guidance
        return 1.5 if labelled else 1.0


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # work units: each block exports its EMA weights this often and the run logs a preview
    # of the chained blocks (a sample grid or text) to MLflow while it trains; 0: only the final evaluation

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every}: must be >= 0 (work units; 0 turns previews off)")


# ---- the system around the library: plain data here, used by coordinator/ and worker/ ----------
@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # host:port | ray://host:port | auto; None: local (or `ray job submit`'s cluster)
    num_cpus: int | None = None  # CPUs of the local Ray; None = enough for one actor per block
    num_gpus: int | None = None  # GPUs of the local Ray; None = detected (set it to test placement without GPUs)
    resources: dict = field(default_factory=dict)  # custom resources of the local Ray, e.g. {A100: 2}


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # None: an embedded redis-server on a free 127.0.0.1 port, data under output_dir/redis
    reconnect_seconds: float = 300.0  # how long every client retries (with backoff) through one Redis outage

    def __post_init__(self) -> None:
        if not self.reconnect_seconds > 0:
            raise ConfigError(f"redis.reconnect_seconds={self.reconnect_seconds}: must be > 0 (seconds)")
        problem = None if self.url is None else _redis_url_problem(str(self.url))
        if problem:  # the message never repeats the URL: it may hold a password
            raise ConfigError(
                f"redis.url: {problem}; expected redis://host:port/db (or rediss://, unix:///path, memory://<name>), "
                "with :password@ before the host if it needs one, or leave it unset for the embedded Redis"
            )


def _redis_url_problem(url: str) -> str | None:
    """What is wrong with a run-store URL, or None."""
    from urllib.parse import urlsplit

    if not url.strip():
        return "empty"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as e:
        return f"malformed ({e})"
    if parts.scheme not in ("redis", "rediss", "unix", "memory") or "://" not in url:
        return f"scheme {parts.scheme + '://' if parts.scheme else '(none)'} is not a run store"
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            return "no host"
        db = parts.path.strip("/")
        if db and not db.isdigit():
            return f"database {db!r} is not a number"
    if parts.scheme == "unix" and not parts.path:
        return "no socket path"
    return None


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db (artifacts in output_dir/mlartifacts)
    experiment: str | None = None  # None: the run's name
    wait_seconds: float = 1800.0  # registration and the run's end wait this long for an unreachable MLflow

    def __post_init__(self) -> None:
        if not self.wait_seconds > 0:
            raise ConfigError(f"mlflow.wait_seconds={self.wait_seconds}: must be > 0 (seconds)")


@dataclass(frozen=True)
class StorageConfig:
    path: str | None = None  # checkpoints, shards, exported blocks: a path or pyarrow.fs URI; None: output_dir/storage


@dataclass(frozen=True)
class WorkersConfig:
    backend: str = "ray"  # a Backend: ray | inline
    num_cpus: float = 1.0  # per block actor (Ray); also its torch threads when train.threads=0
    num_gpus: float = 0.0  # per block: 1, fractional (0.5: two blocks share a GPU) or 0 on CPU
    resources: dict = field(default_factory=dict)  # custom Ray resources per block, e.g. {A100: 1}
    external: tuple[int, ...] = ()  # block indices left to `python -m worker block=K run=<id> redis.url=...`
    max_restarts: int = 2  # per block: a failed block is restarted from its checkpoint this often
    lease_seconds: float = 30.0  # a worker that misses heartbeats this long loses its block
    schedule_timeout: float = 600.0  # seconds a block's actor may wait for resources the cluster lacks

    def __post_init__(self) -> None:
        _set_enum(self, "workers.backend", Backend)
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("workers.num_cpus and workers.num_gpus must be >= 0")
        if self.max_restarts < 0:
            raise ConfigError(f"workers.max_restarts={self.max_restarts}: must be >= 0")
        if not self.schedule_timeout > 0:
            raise ConfigError(f"workers.schedule_timeout={self.schedule_timeout}: must be > 0 (seconds)")
        object.__setattr__(self, "external", tuple(self.external))
        object.__setattr__(self, "resources", dict(self.resources))


@dataclass(frozen=True)
class RegistryConfig:
    champion_threshold: float | None = None  # promote a registered set to `champion` here; None: the family's headline


@dataclass(frozen=True)
class RunConfig:
    name: str = "dit-digits"  # run / registered model name
    seed: int = 0  # the run's root seed: every block's init, data order and noise derive from it
    output_dir: str = "outputs/dit-digits"  # the Hydra config sets outputs/${name}
    baseline: bool = True  # also train the end-to-end model (B=1, same depth, same steps) and compare
    noise: SigmaLevels = field(default_factory=SigmaLevels)  # EDM's training density and preconditioning
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    model: ModelConfig = field(default_factory=lambda: model_config({}))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    resume: str | None = None  # a run id: continue that run (its manifest in Redis) instead of a new one

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}: must be an integer")
        family = self.family
        if self.data.path is None and self.data.source != family.data:
            raise ConfigError(
                f"model.family={family.name} trains on data={family.data}, not data={self.data.source}: "
                f"add data={family.data} (or use experiment={family.name}_{family.data})"
            )
        family.check(self)
        layers, num = self.model.resolved().layers, self.blocks.num
        if num > layers:
            raise ConfigError(f"blocks.num={num}: more blocks than model.layers={layers}")
        if layers % num:
            raise ConfigError(f"blocks.num={num}: must divide model.layers={layers} (blocks have equal depth)")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: must be a non-empty name without '/'")
        for b in self.workers.external:
            if not 0 <= b < num:
                raise ConfigError(f"workers.external={list(self.workers.external)}: block {b} is not in 0..{num - 1}")

    @property
    def family(self) -> Family:
        """The registered family of ``model.family``."""
        return _family(self.model.family)

    @property
    def seq_len(self) -> int | None:
        """A text family's context: its rows are (seq_len + 1)-token windows; None for images."""
        return self.model.resolved().seq_len if self.family.kind == "text" else None

    @property
    def levels(self) -> Levels:
        """The noise-level space the family's blocks partition (sigma, or MDM's masking time t)."""
        return self.family.levels(self)

    def to_dict(self) -> dict:
        """Plain nested dict (enums as strings): JSON-safe, and ``load_run_config`` reads it back."""
        return dataclasses.asdict(self, dict_factory=_plain)

    def params(self) -> dict:
        """Flat ``section.key`` parameters for the tracker: ``model.*`` is the chosen family's resolved
        network config (plus family and size); None values are left out."""
        d = self.to_dict()
        d["model"] = {"family": self.model.family, "size": self.model.size}
        d["model"] |= dataclasses.asdict(self.model.resolved(), dict_factory=_plain)
        return dict(_flatten(d))


def _plain(items: list[tuple[str, object]]) -> dict:
    return {k: v.value if isinstance(v, Enum) else v for k, v in items}


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif v is not None:
            yield f"{prefix}{k}", v
