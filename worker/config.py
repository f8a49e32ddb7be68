"""The run config schema in Hydra: ConfigStore registration, the YAML location, and dict -> RunConfig.

The schema is ``dblocks.config`` (dataclasses, no Hydra there); this module registers it:

- ``schema``: the root (package ``_global_``), one per command: ``run``, ``sample``, ``worker`` (RunConfig
  plus the command's own arguments). ``configs/config.yaml`` selects ``schema: run``; the other
  commands' primary configs (``sample.yaml``, ``worker.yaml``) override it.
- ``model``: one option per registered family (``model=dit``, ``model=ar``, ...).
- ``data``: one option per data source; ``blocks``: one option per partition kind.

The YAML under ``configs/`` (shipped as the ``configs`` package) holds only what differs from the
dataclass defaults: the defaults list, the output directory and the experiments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from importlib.resources import files

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dblocks.config import (
    BlocksConfig,
    ConfigError,
    DataConfig,
    DataSource,
    ModelConfig,
    Partition,
    RunConfig,
    model_class,
    model_options,
)

from .redaction import redact


@dataclass(frozen=True)
class RunArgs(RunConfig):
    """``dblocks-run``: the run's config plus ``only``."""

    only: tuple[int, ...] = ()  # train just these blocks, in this process, without the baseline; (): the whole run


@dataclass(frozen=True)
class SampleArgs(RunConfig):
    """``dblocks-sample``: the run's config plus which registered set to draw and where to write it."""

    alias: str = "champion"  # champion | candidate | any alias you set
    out: str | None = None  # PNG path; None: <output_dir>/samples-<alias>.png
    model_prefix: str | None = None  # registered models <prefix>-block<b>; None: the run's name


@dataclass(frozen=True)
class WorkerArgs(RunConfig):
    """``dblocks-worker``: join run ``run`` (on ``redis.url``) and train its block ``block``."""

    block: int | None = None
    run: str | None = None


def config_dir() -> str:
    """The directory of the YAML configs, wherever the ``configs`` package is installed."""
    return str(files("configs"))


def _writable(node: DictConfig | ListConfig) -> DictConfig | ListConfig:
    """Frozen dataclasses give read-only nodes; overrides and merges need them writable (the values
    are frozen again when ``OmegaConf.to_object`` builds the dataclasses)."""
    OmegaConf.set_readonly(node, None)
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            _writable(child)
    return node


def _node(obj) -> DictConfig:
    return _writable(OmegaConf.structured(obj))


def _root(cls: type[RunConfig], model: type[ModelConfig] = ModelConfig) -> DictConfig:
    """The schema of ``cls`` with ``model`` open to any family's option (the group picks it)."""
    root = _node(cls)
    root.model = _node(model)
    for section in ("ray", "workers"):  # custom resource names are the user's: ``ray.resources={A100: 2}``
        OmegaConf.set_struct(root[section].resources, False)
    return root


def register() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent; the entry points call it)."""
    cs = ConfigStore.instance()
    for name, cls in {"run": RunArgs, "sample": SampleArgs, "worker": WorkerArgs}.items():
        cs.store(group="schema", name=name, node=_root(cls), package="_global_")
    for name, option in model_options().items():
        cs.store(group="model", name=name, node=_node(option))
    for source in DataSource:
        cs.store(group="data", name=source.value, node=_node(DataConfig(source=source)))
    for kind in Partition:
        cs.store(group="blocks", name=kind.value, node=_node(BlocksConfig(partition=kind)))


def load_run_config(d: dict | DictConfig) -> RunConfig:
    """A composed config or a plain dict (a manifest's ``config``, ``run.to_dict()``) -> the validated
    RunConfig; an unknown key, a bad type or a broken rule is a one-line ConfigError naming the key."""
    if isinstance(d, DictConfig):
        d = OmegaConf.to_container(d, resolve=True)
    d = {k: v for k, v in d.items() if k != "hydra"}
    model = d.get("model")
    family = model.get("family", ModelConfig.family) if isinstance(model, dict) else ModelConfig.family
    root = _root(RunConfig, model_class(family))
    for key, value in d.items():
        if key in root and isinstance(root._get_node(key), DictConfig) and not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of {key}.* settings")
    try:
        return OmegaConf.to_object(OmegaConf.merge(root, d))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None


def load_command(cfg: DictConfig) -> tuple[RunConfig, dict]:
    """A command's composed config -> (the RunConfig, the command's own arguments, e.g. ``{"alias": ...}``)."""
    own = {f.name for f in fields(OmegaConf.get_type(cfg))} - {f.name for f in fields(RunConfig)}
    d = OmegaConf.to_container(cfg, resolve=True)
    args = {name: d.pop(name) for name in own}
    return load_run_config(d), args


def fail(e: BaseException) -> None:
    """End a console script on a user error: its first line (passwords masked) and exit status 2."""
    print(f"error: {redact(str(e).strip().splitlines()[0])}", file=sys.stderr)
    sys.exit(2)


def check_command_line(config_name: str, args: list[str]) -> DictConfig | None:
    """The command line's overrides composed once before Hydra runs the command, so that a wrong type
    (``train.lr=abc``, ``seed=abc``), an unknown key or option, or an override Hydra cannot parse is a
    one-line ConfigError naming the key and what it expects, not Hydra's multi-line report. Returns the
    composed config; Hydra's own flags (``--cfg``, ``--help``, ``-m``, ...) leave the check to Hydra (None)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    if any(a.startswith("-") for a in args):
        return None
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name, overrides=list(args))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(redact(_override_error(e, args))) from None


_EXPECTED = {"Float": "a number", "Integer": "an integer", "String": "a string", "Boolean": "true or false"}


def _override_error(e: Exception, args: list[str]) -> str:
    """A composition error as ``key=value: what is wrong; what to do``."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    what = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    key = getattr(cause, "full_key", None)
    if isinstance(e, OverrideParseException):
        bad = next((a for a in args if _parses_not(a)), " ".join(args))
        return f"{bad}: Hydra cannot parse this override ({what}); quote the value, e.g. 'key=\"value\"'"
    if isinstance(e, MissingConfigException):  # a group option that does not exist: model=nope
        text = str(e)
        listed = text.split("Available options in", 1)[-1].split("Config search path", 1)[0]
        options = [line.strip() for line in listed.splitlines()[1:] if line.strip()]
        group = text.split("Could not find '", 1)[-1].split("/", 1)[0]
        given = next((a for a in args if a.split("=", 1)[0].lstrip("+~") == group), group)
        return f"{given}: no such option; choose one of {', '.join(options)}"
    if not key:
        return what
    given = next((a for a in args if a.split("=", 1)[0].lstrip("+~") == key), key)
    if "could not be converted to" in what:
        kind = what.rsplit(" ", 1)[-1]
        return f"{given}: expected {_EXPECTED.get(kind, kind)}"
    if "is not a valid bool" in what:
        return f"{given}: expected true or false"
    if "is not a ListConfig, list or tuple" in what:
        return f"{given}: expected a list, e.g. {key}=[0,1]"
    if what.startswith("Key ") and " not in " in what:
        return f"{given}: no such setting ({what}); --cfg job prints every key"
    return f"{given}: {what}"


def _parses_not(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([arg])
    except Exception:  # noqa: BLE001  (any parser error marks the override)
        return True
    return False


def _one_line(e: OmegaConfBaseException) -> str:
    """OmegaConf's multi-line message as ``key: what is wrong``."""
    what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{key}: {what}" if key else what
