"""Typed run configuration: defaults, round trip, Hydra composition, and one-line errors that name the field."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dblocks.config import ConfigError, RunConfig, model_config, model_options, resolve_device
from dblocks.families import FAMILIES
from worker.config import config_dir, load_command, load_run_config, register

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def _error(d: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.mark.parametrize(
    "d, field",
    [
        ({"blocks": {"num": 0}}, "blocks.num"),
        ({"blocks": {"num": -2}}, "blocks.num"),
        ({"blocks": {"num": 1.5}}, "blocks.num"),
        ({"model": {"size": "debug"}, "blocks": {"num": 7}}, "blocks.num"),  # more blocks than 6 layers
        ({"model": {"size": "debug"}, "blocks": {"num": 4}}, "blocks.num"),  # 4 does not divide 6
        ({"noise": {"sigma_min": 80.0, "sigma_max": 80.0}}, "noise.sigma_min"),
        ({"noise": {"sigma_min": 100.0}}, "noise.sigma_min"),
        ({"noise": {"sigma_min": 0.0}}, "noise.sigma_min"),
        ({"noise": {"p_std": 0.0}}, "noise.p_std"),
        ({"blocks": {"gamma": -0.05}}, "blocks.gamma"),
        ({"blocks": {"partition": "linear"}}, "blocks.partition"),
        ({"model": {"size": "huge"}}, "model.size"),
        ({"model": {"size": "debug", "heads": 5}}, "model.heads"),
        ({"model": {"family": "unet"}}, "model.family"),
        ({"train": {"lr": 0.0}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"sample": {"steps": 1}}, "sample.steps"),
        ({"sample": {"grid": "linear"}}, "sample.grid"),
        ({"blocks": {"nums": 3}}, "blocks.nums"),  # unknown key
        ({"bogus": 1}, "bogus"),
        ({"noise": 5}, "noise"),  # a section that is not a mapping
        # added with the Hydra schema
        ({"train": {"lr": "abc"}}, "train.lr"),  # a bad type
        ({"train": {"device": "gpu"}}, "train.device"),
        ({"train": {"log_every": 100}}, "train.log_every"),  # removed: nothing read it
        ({"workers": {"backend": "slurm"}}, "workers.backend"),
        ({"workers": {"external": [3]}}, "workers.external"),
        ({"model": {"seq_len": 32}}, "model.seq_len"),  # a key of another family (ar), not dit's
        ({"model": {"family": "ar"}}, "model.family"),  # ar trains on text
        ({"model": {"family": "recurrent"}, "data": {"source": "text"}, "blocks": {"num": 2}}, "blocks.num"),
        (
            {"model": {"family": "mdm"}, "data": {"source": "text"}, "train": {"loss_weighting": False}},
            "loss_weighting",
        ),
    ],
)
def test_bad_value_raises_one_line_config_error_naming_the_field(d, field):
    assert field in _error(d)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_defaults_match_the_paper():
    cfg = load_run_config({})
    assert cfg == RunConfig()
    n = cfg.noise
    assert (n.sigma_min, n.sigma_max, n.p_mean, n.p_std, n.sigma_data) == (0.002, 80.0, -1.2, 1.2, 0.5)
    assert cfg.blocks.num == 3 and cfg.blocks.gamma == 0.05 and cfg.blocks.partition == "equiprob"
    assert cfg.train.grad_clip == 1.0  # design.md 1.1: clip gradients at norm 1.0
    assert cfg.sample.steps == 50


def test_load_overrides_and_round_trips():
    d = {
        "seed": 7,
        "model": {"size": "debug", "layers": 12},
        "blocks": {"num": 4, "gamma": 0.1, "partition": "uniform_log"},
        "train": {"batch_size": 16, "betas": [0.9, 0.95]},
    }
    cfg = load_run_config(d)
    assert cfg.seed == 7 and cfg.blocks.num == 4 and cfg.model.resolved().layers == 12
    assert cfg.train.betas == (0.9, 0.95)
    assert load_run_config(cfg.to_dict()) == cfg
    # B = L is allowed (one layer per block), B = 1 is the end-to-end model.
    assert load_run_config({"model": {"size": "debug"}, "blocks": {"num": 6}}).blocks.num == 6
    assert load_run_config({"model": {"size": "debug"}, "blocks": {"num": 1}}).blocks.num == 1


def test_enums_are_strings_and_the_dict_is_json():
    cfg = load_run_config({"blocks": {"partition": "uniform_log"}, "sample": {"grid": "karras"}})
    assert cfg.blocks.partition == "uniform_log" and cfg.sample.grid == "karras" and cfg.workers.backend == "ray"
    assert cfg.data.source == "digits" and f"{cfg.blocks.partition}" == "uniform_log"
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["blocks"]["partition"] == "uniform_log" and type(cfg.to_dict()["sample"]["grid"]) is str
    assert load_run_config(d) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # the generated model option pickles by reference


def test_the_model_group_has_one_option_per_family_with_every_network_setting():
    assert set(model_options()) == set(FAMILIES)
    for name, family in FAMILIES.items():
        option = model_options()[name]
        settings = {f.name for f in dataclasses.fields(option)} - {"family", "size"}
        assert settings == {f.name for f in dataclasses.fields(family.config)}
        assert all(getattr(option(), s) is None for s in settings)  # the size registry holds the values
        assert option().resolved() == family.sizes["tiny"]


def test_model_config_picks_the_family_option():
    m = model_config({"family": "ar", "size": "debug", "mixed": True})
    assert type(m) is model_options()["ar"] and m.resolved().mixed is True
    with pytest.raises(ConfigError, match=r"^model\.patch=2: not a setting of the ar family"):
        model_config({"family": "ar", "patch": 2})
    with pytest.raises(ConfigError, match="model.family"):
        model_options()["dit"](family="vit")  # the dit option's settings under another family


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_params_hold_only_the_chosen_family_keys_resolved(experiment, compose_config):
    cfg, _ = load_command(compose_config(f"experiment={experiment}"))
    params = cfg.params()
    model = {k.removeprefix("model.") for k in params if k.startswith("model.")}
    assert model == {"family", "size"} | {f.name for f in dataclasses.fields(cfg.family.config)}
    assert None not in params.values()
    resolved = cfg.model.resolved()
    assert all(params[f"model.{f.name}"] == getattr(resolved, f.name) for f in dataclasses.fields(resolved))
    assert params["blocks.num"] == cfg.blocks.num and params["train.lr"] == cfg.train.lr


def test_device_is_checked_for_syntax_here_and_resolved_where_the_worker_runs():
    cfg = load_run_config({"train": {"device": "cuda:1"}})  # a CPU head node accepts it
    assert cfg.train.device == "cuda:1"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^train\.device='cuda': CUDA is not available") as info:
            resolve_device("cuda")
        assert "\n" not in str(info.value)


# ---- Hydra composition: the YAML under configs/ with the registered schema --------------------------
@pytest.fixture(scope="module")
def compose_config():
    register()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield lambda *overrides, name="config": compose(name, overrides=list(overrides))


def test_the_composed_default_is_the_dataclass_default(compose_config):
    cfg, args = load_command(compose_config())
    assert args == {"only": []}
    assert cfg == RunConfig()  # output_dir: outputs/${name} in config.yaml
    assert cfg.baseline is True  # the main job trains the end-to-end baseline beside the blocks


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, compose_config):
    cfg, _ = load_command(compose_config(f"experiment={experiment}"))
    assert cfg.output_dir == f"outputs/{cfg.name}"
    assert cfg.data.source == cfg.family.data
    assert cfg.levels.space in ("sigma", "t")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_sets_only_what_differs_from_the_defaults(experiment, compose_config):
    """YAML holds only what differs: every value an experiment sets changes the config it starts from."""
    raw = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "experiment" / f"{experiment}.yaml"))
    groups = [f"{k.split('/')[-1]}={v}" for item in (raw or {}).pop("defaults", []) for k, v in item.items()]
    base = compose_config(*groups)
    for key, value in _leaves(raw or {}):
        assert OmegaConf.select(base, key) != value, f"{experiment}.yaml: {key}={value} is already the default"


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


def test_the_commands_add_their_own_arguments(compose_config):
    cfg, args = load_command(compose_config("experiment=debug", "alias=candidate", name="sample"))
    assert args == {"alias": "candidate", "out": None, "model_prefix": None} and cfg.name == "debug"
    cfg, args = load_command(compose_config("block=1", "run=abc", "redis.url=redis://h:6379/0", name="worker"))
    assert args == {"block": 1, "run": "abc"} and cfg.redis.url == "redis://h:6379/0"
    _, args = load_command(compose_config("experiment=debug", "only=[1]"))
    assert args == {"only": [1]}


def test_groups_select_the_family_data_and_partition(compose_config):
    cfg, _ = load_command(compose_config("model=ar", "data=text", "blocks=uniform_log", "blocks.num=4"))
    assert cfg.model.family == "ar" and cfg.data.source == "text" and cfg.blocks.partition == "uniform_log"


@pytest.mark.parametrize("override, key", [("train.lr=abc", "train.lr"), ("model.seq_len=3", "model.seq_len")])
def test_a_bad_override_names_its_key(override, key, compose_config):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(override)
    assert key in f"{info.value} {info.value.__cause__}"
