"""Typed run configuration. Hydra composes it at the entry points; the library only sees these.

The dataclass tree mirrors the Hydra config tree, so a validation error names the config key
a user must fix (``blocks.num``, ``model.size``, ...). Hyperparameters that depend on batch
size are in samples (warm-up, EMA half-life), so they survive a change of batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch

from .models.dit import DiTConfig
from .noise import PARTITION_KINDS


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and how to fix it."""


@dataclass(frozen=True)
class NoiseConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(
                f"noise.sigma_min={self.sigma_min} must be > 0 and below noise.sigma_max={self.sigma_max}"
            )
        if self.p_std <= 0:
            raise ConfigError(f"noise.p_std={self.p_std}: must be > 0")
        if self.sigma_data <= 0:
            raise ConfigError(f"noise.sigma_data={self.sigma_data}: must be > 0")


@dataclass(frozen=True)
class BlocksConfig:
    num: int = 3
    gamma: float = 0.05
    partition: str = "equiprob"

    def __post_init__(self) -> None:
        if not isinstance(self.num, int) or self.num < 1:
            raise ConfigError(f"blocks.num={self.num}: must be an integer >= 1")
        if self.gamma < 0:
            raise ConfigError(f"blocks.gamma={self.gamma}: must be >= 0 (0 disables overlap)")
        if self.partition not in PARTITION_KINDS:
            raise ConfigError(f"blocks.partition={self.partition!r}: must be one of {', '.join(PARTITION_KINDS)}")


def _config_fn(family: str):
    """model.family -> its size registry's config function (each model module needs torch only)."""
    if family == "dit":
        from .models.dit import dit_config as fn
    elif family == "vit":
        from .models.vit import vit_config as fn
    elif family == "ar":
        from .models.ar import ar_config as fn
    elif family == "mdm":
        from .models.mdm import mdm_config as fn
    else:
        from .models.recurrent import recurrent_config as fn
    return fn


FAMILY_DATA = {"dit": "digits", "vit": "digits", "ar": "text", "mdm": "text", "recurrent": "text"}
FAMILY_NAMES = tuple(FAMILY_DATA)


@dataclass(frozen=True)
class ModelConfig:
    """``model.*``: a family, a named size and overrides; a key the family lacks is an error."""

    family: str = "dit"
    size: str = "tiny"
    layers: int | None = None  # None: the size's default total depth L
    width: int | None = None
    heads: int | None = None
    patch: int | None = None  # dit, vit
    label_dropout: float | None = None  # dit (classifier-free guidance)
    seq_len: int | None = None  # text families: context length in characters
    mixed: bool | None = None  # ar: add the plain next-token loss at the lowest-noise block
    schedule: str | None = None  # mdm: masking schedule alpha(t), linear | cosine
    prelude: int | None = None  # recurrent: layer counts of prelude / core / coda
    core: int | None = None
    coda: int | None = None
    iterations: int | None = None  # recurrent: K core iterations at inference (and the baseline's unroll)
    bptt: int | None = None  # recurrent baseline: backprop through the last bptt iterations

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise ConfigError(f"model.family={self.family!r}: choose one of {', '.join(FAMILY_NAMES)}")
        self.resolved()  # validates size and overrides

    @property
    def data(self) -> str:
        """The built-in data source this family trains on (digits or text)."""
        return FAMILY_DATA[self.family]

    def resolved(self):
        """The family's typed config (DiTConfig, ViTConfig, ...) for this size and overrides."""
        make = _config_fn(self.family)
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("family", "size")}
        try:
            return make(self.size, **overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def dit(self) -> DiTConfig:
        if self.family != "dit":
            raise ConfigError(f"model.family={self.family!r}: this needs the dit family")
        return self.resolved()


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # digits (scikit-learn, images) | text (Shakespeare, characters)
    test_size: int = 360  # digits: the fixed held-out images (text: 2% validation + 2% test, fixed)
    split_seed: int = 0
    shards: int = 2  # parquet shards of the train split; work units cycle over them

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source={self.source!r}: built in are {', '.join(DATA_SOURCES)}")
        if not 0 < self.test_size < 1797:
            raise ConfigError(f"data.test_size={self.test_size}: must be in 1..1796")
        if not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"data.shards={self.shards}: must be an integer >= 1")


DATA_SOURCES = ("digits", "text")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    warmup_samples: int = 10_000
    ema_halflife_samples: int = 20_000
    ema_rampup: float = 0.1  # EMA half-life is at most this fraction of the samples seen (EDM)
    loss_weighting: bool = True  # w(sigma) of Eq. 6; false = the unweighted ablation (sigma families)
    unit_steps: int = 50  # optimizer steps per work unit (the unit of dispatch, ack and resume)
    checkpoint_every: int = 500  # steps; rounded up to a whole work unit
    log_every: int = 100  # steps
    threads: int = 0  # torch threads per worker; 0 = leave torch's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "unit_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: must be > 0")
        if self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip}: must be > 0")
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"train.device={self.device!r}: use auto, cpu, cuda or cuda:N") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"train.device={self.device!r}: CUDA is not available here; use auto or cpu")


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50  # Euler grid points (each is one denoiser call)
    guidance: float = 1.5  # classifier-free guidance scale; 1 = none
    per_class: int = 50  # class-conditional samples per class for the metrics
    grid: str = "auto"  # "cdf" (DiffusionBlocks), "karras" (EDM rho=7), "auto": cdf if B > 1 else karras

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ConfigError(f"sample.steps={self.steps}: must be >= 2")
        if self.per_class < 1:
            raise ConfigError(f"sample.per_class={self.per_class}: must be >= 1")
        if self.grid not in ("auto", "cdf", "karras"):
            raise ConfigError(f"sample.grid={self.grid!r}: must be one of auto, cdf, karras")


# ---- the system around the library: plain data here, used by coordinator/ and worker/ ----------
@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: local Ray (or the cluster when run under `ray job submit`)
    num_cpus: int | None = None  # CPUs of the local Ray; None = enough for one actor per block
    num_gpus: int | None = None  # GPUs of the local Ray; None = detected (set it to test placement without GPUs)
    resources: dict = field(default_factory=dict)  # custom resources of the local Ray, e.g. {"A100": 2}


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None  # None: an embedded redis-server on a free 127.0.0.1 port


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db
    experiment: str | None = None  # None: the run's name


@dataclass(frozen=True)
class StorageConfig:
    path: str | None = None  # checkpoints and shards: a local path or a pyarrow.fs URI; None: <output_dir>/storage


@dataclass(frozen=True)
class WorkersConfig:
    backend: str = "ray"  # ray (one actor per block) | inline (in this process, one block after another)
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # 1, fractional (0.5: two blocks share a GPU) or 0 on CPU
    resources: dict = field(default_factory=dict)  # custom Ray resources, e.g. {"A100": 1} to pin a GPU type
    external: tuple[int, ...] = ()  # block indices left to external workers (python -m worker ...)
    max_restarts: int = 2  # per block: a failed block is restarted from its checkpoint this often
    lease_seconds: float = 30.0  # a worker that misses heartbeats this long loses its block

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "inline"):
            raise ConfigError(f"workers.backend={self.backend!r}: must be ray or inline")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("workers.num_cpus and workers.num_gpus must be >= 0")
        if self.max_restarts < 0:
            raise ConfigError(f"workers.max_restarts={self.max_restarts}: must be >= 0")
        object.__setattr__(self, "external", tuple(self.external or ()))
        object.__setattr__(self, "resources", dict(self.resources or {}))


@dataclass(frozen=True)
class RegistryConfig:
    champion_min_accuracy: float = 0.8  # digits families: promote a set to `champion` at this accuracy
    champion_max_bpc: float = 3.5  # text families: promote at or below this many bits per character


@dataclass(frozen=True)
class RunConfig:
    name: str = "dit-digits"
    seed: int = 0
    output_dir: str = "outputs/dit-digits"
    baseline: bool = False  # also train the end-to-end model of the same depth and compare
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    resume: str | None = None  # a run id: continue that run (its manifest in Redis) instead of a new one

    def __post_init__(self) -> None:
        m = self.model
        if m.data != self.data.source:
            raise ConfigError(f"model.family={m.family} trains on data={m.data}, not data={self.data.source}: "
                              f"add data={m.data} (or use experiment={m.family}_{m.data})")  # fmt: skip
        layers = m.resolved().layers
        if m.family == "recurrent" and self.blocks.num != 1:
            raise ConfigError(f"blocks.num={self.blocks.num}: the recurrent family trains its core as one block; use blocks.num=1")
        if m.family == "mdm" and not self.train.loss_weighting:
            raise ConfigError("train.loss_weighting=false: the mdm family's ELBO weight is not an ablation; keep it true")
        if self.blocks.num > layers:
            raise ConfigError(f"blocks.num={self.blocks.num}: more blocks than model.layers={layers}")
        if layers % self.blocks.num:
            raise ConfigError(
                f"blocks.num={self.blocks.num}: must divide model.layers={layers} (blocks have equal depth)"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: must be a non-empty name without '/'")
        for b in self.workers.external:
            if not isinstance(b, int) or not 0 <= b < self.blocks.num:
                raise ConfigError(f"workers.external={list(self.workers.external)}: block {b} is not in 0..{self.blocks.num - 1}")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a plain nested dict (e.g. ``OmegaConf.to_container(cfg)``); unknown keys fail."""
        return _build(cls, d, prefix="")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(known)})")
    kwargs = {}
    for name, value in d.items():
        default = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        kwargs[name] = _build(type(sub), value, f"{prefix}{name}.") if dataclasses.is_dataclass(sub) else value
    return cls(**kwargs)
