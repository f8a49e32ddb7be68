"""Your own data, end to end: datasets built here (drawn PNGs, generated text), prepared with
``dblocks-data``, trained through the distributed job at debug size (local Ray, a real redis-server,
sqlite MLflow), registered with their data's URI and hash, sampled in the data's shape and colour.
The run-time checks of bad data (before anything trains) run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw
from services import run_cli, service_stack

from coordinator.data import PrepareConfig, prepare
from coordinator.run import open_data, train_shards
from dblocks.config import ConfigError
from dblocks.datacard import DataError
from worker.config import load_run_config
from worker.dataset import open_dataset
from worker.storage import Storage

SHAPES = ("circle", "square", "triangle")
QUICK = [
    "model.size=debug",
    "train.steps=40",
    "train.unit_steps=20",
    "train.checkpoint_every=20",
    "train.batch_size=16",
    "train.warmup_samples=64",
    "train.ema_halflife_samples=64",
    "sample.steps=5",
    "sample.per_class=2",
    "registry.champion_threshold=0",
    "baseline=false",
    "workers.num_gpus=0",
]


def draw(shape: str, size: tuple[int, int], colour: tuple[int, int, int], rng, mode: str = "RGB") -> Image.Image:
    """One picture of ``shape`` on a random background, at a random place."""
    w, h = size
    im = Image.new(
        mode, size, tuple(int(v) for v in rng.integers(0, 80, 3)) if mode == "RGB" else int(rng.integers(0, 80))
    )
    d = ImageDraw.Draw(im)
    x, y, r = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)), min(w, h) // 4
    fill = colour if mode == "RGB" else 255
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return im


def rgb_folder(root: Path, per_class: int = 24) -> Path:
    """Labelled RGB pictures of three shapes, each class in its own colour, of mixed sizes (40x36, 36x40)."""
    rng = np.random.default_rng(0)
    colours = {"circle": (230, 40, 40), "square": (40, 200, 60), "triangle": (50, 80, 230)}
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for i in range(per_class):
            size = (40, 36) if i % 2 else (36, 40)
            draw(shape, size, colours[shape], rng).save(root / shape / f"{i:03d}.png")
    return root


def grey_folder(root: Path, n: int = 64) -> Path:
    """Unlabelled grey 28x28 pictures of random shapes, in one flat folder."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        draw(SHAPES[i % 3], (28, 28), (0, 0, 0), rng, mode="L").save(root / f"{i:03d}.png")
    return root


def text_folder(root: Path) -> Path:
    """Three generated documents of simple English-like lines."""
    rng = np.random.default_rng(2)
    words = "the a cat dog sat ran on under mat log and then".split()
    root.mkdir(parents=True)
    for k in range(3):
        lines = [" ".join(rng.choice(words, 6)) + "." for _ in range(600)]
        (root / f"doc{k}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("own-data")
    rgb = prepare(PrepareConfig(input=str(rgb_folder(base / "in-rgb")), output=str(base / "rgb"), image_size=32))
    grey = prepare(PrepareConfig(input=str(grey_folder(base / "in-grey")), output=str(base / "grey")))
    text = prepare(PrepareConfig(input=str(text_folder(base / "in-text")), output=str(base / "text"), chunk=1024))
    assert rgb.shape == (3, 32, 32) and rgb.classes == SHAPES and grey.shape == (1, 28, 28) and not grey.classes
    assert text.kind == "text" and text.vocab_size < 84
    return {"rgb": str(base / "rgb"), "grey": str(base / "grey"), "text": str(base / "text"), "base": base}


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    return service_stack(redis_server, tmp_path_factory.mktemp("own-data-stack"), db=0)


def train(stack, name: str, *overrides: str) -> tuple[Path, dict]:
    out = stack["base"] / name
    proc = run_cli(
        "coordinator",
        *overrides,
        *QUICK,
        f"name={name}",
        f"redis.url={stack['redis']}",
        f"mlflow.tracking_uri={stack['mlflow']}",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "metrics.json").read_text())


def registered_tags(stack, name: str, blocks: int) -> list[dict]:
    c = MlflowClient(stack["mlflow"], registry_uri=stack["mlflow"])
    return [c.get_model_version_by_alias(f"{name}-block{b}", "candidate").tags for b in range(blocks)]


def test_labelled_rgb_images_train_the_cifar_dit_preset_on_ray_and_sample_in_colour(datasets, stack):
    out, metrics = train(stack, "rgb-dit", "experiment=dit_cifar", f"data.path={datasets['rgb']}")
    (res,) = metrics["results"].values()
    assert {"heldout_loss", "fd_pixel", "fd_feature", "sample_accuracy"} <= set(res)
    assert metrics["config"]["model"]["image_size"] == 32 and metrics["config"]["model"]["channels"] == 3
    grid = Image.open(out / "blocks" / "samples.png")  # a row per class, sample.per_class=2 columns, 4x
    assert grid.mode == "RGB" and grid.size == ((2 * 33 + 1) * 4, (3 * 33 + 1) * 4)
    card = open_dataset(datasets["rgb"]).card
    for tags in registered_tags(stack, "rgb-dit", 3):
        assert tags["data_uri"] == datasets["rgb"] and tags["data_hash"] == card.content_hash


def test_unlabelled_grey_images_train_the_dit_unconditionally(datasets, stack):
    out, metrics = train(stack, "grey-dit", "experiment=debug", f"data.path={datasets['grey']}")
    (res,) = metrics["results"].values()
    assert "fd_pixel" in res and "sample_accuracy" not in res and not res["champion"]  # no judge: candidate
    assert metrics["config"]["model"]["num_classes"] == 0
    grid = Image.open(out / "blocks" / "samples.png")  # 10 rows of unconditional samples
    assert grid.mode == "L" and grid.size == ((2 * 29 + 1) * 4, (10 * 29 + 1) * 4)
    assert len(registered_tags(stack, "grey-dit", 2)) == 2


def test_a_text_folder_trains_the_masked_diffusion_lm_with_its_own_vocabulary(datasets, stack):
    out, metrics = train(stack, "text-mdm", "experiment=mdm_text", f"data.path={datasets['text']}")
    (res,) = metrics["results"].values()
    card = open_dataset(datasets["text"]).card
    assert metrics["config"]["model"]["vocab_size"] == card.vocab_size < 84
    assert 0 < res["test_bpc"] < 8
    sample = (out / "blocks" / "sample.txt").read_text()
    assert sample and set(sample) <= set(card.vocabulary) | {"\n"}
    assert {t["data_hash"] for t in registered_tags(stack, "text-mdm", 3)} == {card.content_hash}


def test_the_vit_cifar_preset_trains_at_debug_size(datasets, tmp_path):
    proc = run_cli(
        "coordinator",
        "experiment=vit_cifar",
        f"data.path={datasets['rgb']}",
        *QUICK,
        "workers.backend=inline",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = json.loads((tmp_path / "metrics.json").read_text())["results"].values()
    assert 0 <= res["test_accuracy"] <= 1


# ---- bad data at run time: refused before anything trains (in-process) -----------------------------
def _cfg(tmp_path, **d) -> object:
    return load_run_config({"output_dir": str(tmp_path), "model": {"size": "debug"}, **d})


def _storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "storage"))


def test_a_data_path_that_does_not_exist_is_named(tmp_path):
    cfg = _cfg(tmp_path, data={"path": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match=r"data.path=.*nowhere does not exist"):
        open_data(cfg, _storage(tmp_path))


def test_a_dataset_smaller_than_one_batch_is_refused(datasets, tmp_path):
    cfg = _cfg(tmp_path, data={"path": datasets["grey"]}, train={"batch_size": 500})
    cfg, data = open_data(cfg, _storage(tmp_path))
    with pytest.raises(ConfigError, match=r"train.batch_size=500: data.path=.* has only \d+ training rows"):
        train_shards(cfg, data)


def test_images_that_do_not_fit_the_patch_are_refused(datasets, tmp_path):
    cfg = _cfg(tmp_path, data={"path": datasets["grey"]}, model={"size": "debug", "patch": 8})
    with pytest.raises(ConfigError, match=r"does not fit the model: model.patch=8: must divide the image size 28"):
        open_data(cfg, _storage(tmp_path))


def test_a_family_on_the_wrong_kind_of_data_is_refused(datasets, tmp_path):
    cfg = _cfg(tmp_path, model={"family": "ar", "size": "debug"}, blocks={"num": 2}, data={"path": datasets["rgb"]})
    with pytest.raises(ConfigError, match=r"holds images, model.family=ar trains on text"):
        open_data(cfg, _storage(tmp_path))


def test_guidance_on_unlabelled_images_and_a_vit_without_labels_are_refused(datasets, tmp_path):
    cfg = _cfg(tmp_path, data={"path": datasets["grey"]}, sample={"guidance": 2.0})
    with pytest.raises(ConfigError, match=r"sample.guidance=2.0: .* is unlabelled"):
        open_data(cfg, _storage(tmp_path))
    cfg = _cfg(tmp_path, data={"path": datasets["grey"]}, model={"family": "vit", "size": "debug"})
    with pytest.raises(ConfigError, match=r"the ViT classifies, and this dataset has 0 classes"):
        open_data(cfg, _storage(tmp_path))


def test_a_model_override_that_disagrees_with_the_card_is_refused(datasets, tmp_path):
    cfg = _cfg(tmp_path, data={"path": datasets["rgb"]}, model={"size": "debug", "channels": 1})
    with pytest.raises(ConfigError, match=r"model.channels=1: .* has channels 3"):
        open_data(cfg, _storage(tmp_path))


def test_a_shard_changed_after_preparing_fails_the_run_before_training(datasets, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(datasets["rgb"], copy)
    shard = sorted((copy / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    cfg = _cfg(tmp_path, data={"path": str(copy)})
    with pytest.raises(DataError, match=r"part-00000.parquet.*does not match card.json"):
        open_data(cfg, _storage(tmp_path))
    assert not (tmp_path / "storage" / "runs").exists()
