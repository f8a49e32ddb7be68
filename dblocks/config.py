"""Typed run configuration. Hydra composes it at the entry points; the library only sees these.

The dataclass tree mirrors the Hydra config tree, so a validation error names the config key
a user must fix (``blocks.num``, ``model.size``, ...). Hyperparameters that depend on batch
size are in samples (warm-up, EMA half-life), so they survive a change of batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch

from .models.dit import DiTConfig, dit_config
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


@dataclass(frozen=True)
class ModelConfig:
    family: str = "dit"
    size: str = "tiny"
    layers: int | None = None  # None: the size's default depth
    width: int | None = None
    heads: int | None = None
    patch: int | None = None
    label_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.family != "dit":
            raise ConfigError(f"model.family={self.family!r}: only 'dit' is available")
        self.dit()  # validates size and overrides

    def dit(self) -> DiTConfig:
        try:
            return dit_config(
                self.size,
                layers=self.layers,
                width=self.width,
                heads=self.heads,
                patch=self.patch,
                label_dropout=self.label_dropout,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"
    test_size: int = 360
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.source != "digits":
            raise ConfigError(f"data.source={self.source!r}: only 'digits' is built in")
        if not 0 < self.test_size < 1797:
            raise ConfigError(f"data.test_size={self.test_size}: must be in 1..1796")


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
    checkpoint_every: int = 500  # steps
    log_every: int = 100  # steps
    threads: int = 0  # torch threads per worker; 0 = leave torch's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
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

    def __post_init__(self) -> None:
        layers = self.model.dit().layers
        if self.blocks.num > layers:
            raise ConfigError(f"blocks.num={self.blocks.num}: more blocks than model.layers={layers}")
        if layers % self.blocks.num:
            raise ConfigError(
                f"blocks.num={self.blocks.num}: must divide model.layers={layers} (blocks have equal depth)"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: must be a non-empty name without '/'")

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
