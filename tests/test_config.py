"""Typed run configuration: defaults, round trip, and one-line errors that name the field."""

from __future__ import annotations

import pytest

from dblocks import ConfigError, RunConfig


def _error(d: dict) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(d)
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
    ],
)
def test_bad_value_raises_one_line_config_error_naming_the_field(d, field):
    assert field in _error(d)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_defaults_match_the_paper():
    cfg = RunConfig.from_dict({})
    assert cfg == RunConfig()
    n = cfg.noise
    assert (n.sigma_min, n.sigma_max, n.p_mean, n.p_std, n.sigma_data) == (0.002, 80.0, -1.2, 1.2, 0.5)
    assert cfg.blocks.num == 3 and cfg.blocks.gamma == 0.05 and cfg.blocks.partition == "equiprob"
    assert cfg.train.grad_clip == 1.0  # design.md 1.1: clip gradients at norm 1.0
    assert cfg.sample.steps == 50


def test_from_dict_overrides_and_round_trips():
    d = {
        "seed": 7,
        "model": {"size": "debug", "layers": 12},
        "blocks": {"num": 4, "gamma": 0.1, "partition": "uniform_log"},
        "train": {"batch_size": 16, "betas": [0.9, 0.95]},
    }
    cfg = RunConfig.from_dict(d)
    assert cfg.seed == 7 and cfg.blocks.num == 4 and cfg.model.dit().layers == 12
    assert cfg.train.betas == (0.9, 0.95)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    # B = L is allowed (one layer per block), B = 1 is the end-to-end model.
    assert RunConfig.from_dict({"model": {"size": "debug"}, "blocks": {"num": 6}}).blocks.num == 6
    assert RunConfig.from_dict({"model": {"size": "debug"}, "blocks": {"num": 1}}).blocks.num == 1
