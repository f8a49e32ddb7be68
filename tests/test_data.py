"""Bring your own data: ``dblocks-data`` prepares images, arrays and text once as parquet shards + card.json,
and ``worker.dataset`` streams them back, validated (inputs are built here, never downloaded)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from coordinator.data import PrepareConfig, main, prepare
from dblocks.config import ConfigError
from dblocks.datacard import DataCard, DataError, all_shards, card_hash, text_windows, windows_in
from dblocks.text import split_chunks
from worker import dataset
from worker.dataset import open_dataset, write_dataset

META = {b"dblocks.schema_version": b"1"}


# ---- inputs, drawn here ---------------------------------------------------------------------------------
def draw(path: Path, size=(12, 10), mode="RGB", color=(200, 30, 30), fmt=None, seed=0) -> Path:
    """A small image with a filled shape on it, saved as PNG (or ``fmt``)."""
    rng = np.random.default_rng(seed)
    im = Image.new(mode, size, 0 if mode == "L" else (0, 0, 0))
    w, h = size
    box = sorted(rng.integers(0, w, 2)) + sorted(rng.integers(0, h, 2))
    fill = color[0] if mode == "L" else color
    ImageDraw.Draw(im).ellipse((box[0], box[2], box[1] + 1, box[3] + 1), fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def prep(tmp_path: Path, src, out="out", **kw):
    return prepare(PrepareConfig(input=str(src), output=str(tmp_path / out), **kw))


def npz(tmp_path: Path, **arrays) -> Path:
    np.savez(tmp_path / "a.npz", **arrays)
    return tmp_path / "a.npz"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def rgb_folder(tmp_path):
    """Three classes of RGB images of random sizes (the colour tells the class)."""
    colors = {"cat": (220, 20, 20), "dog": (20, 220, 20), "eel": (20, 20, 220)}
    rng = np.random.default_rng(1)
    for name, color in colors.items():
        for i in range(7):
            size = tuple(int(s) for s in rng.integers(14, 40, 2))
            draw(tmp_path / "rgb" / name / f"{i}.png", size, color=color, seed=i)
    draw(tmp_path / "rgb" / "eel" / "7.jpg", (30, 20), color=colors["eel"], fmt="JPEG")
    return tmp_path / "rgb"


@pytest.fixture
def digits(tmp_path):
    prepare(PrepareConfig(input="builtin:digits", output=str(tmp_path / "digits")))
    return open_dataset(str(tmp_path / "digits"))


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("data") / "shakespeare")
    prepare(PrepareConfig(input="builtin:shakespeare", output=uri))
    return open_dataset(uri)


# ---- built-in sets: the same tensors as the in-memory loaders --------------------------------------------
def test_builtin_digits_are_bit_identical_to_load_digits_split(digits):
    from dblocks.data import load_digits_split

    ref = load_digits_split(360, 0)
    for got, want in (
        (digits.split("train"), (ref.train_x, ref.train_y)),
        (digits.split("test"), (ref.test_x, ref.test_y)),
    ):
        assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert digits.card.shape == (1, 8, 8) and digits.card.classes == tuple("0123456789")
    assert [len(s.shards) for s in digits.card.splits.values()] == [2, 2]
    x, y = digits.read_rows(digits.card.splits["train"].shards[1].path, 5, 9)
    assert torch.equal(x, ref.train_x[718 + 5 : 718 + 9]) and torch.equal(y, ref.train_y[718 + 5 : 718 + 9])
    digits.verify()


def test_builtin_shakespeare_matches_load_text_split(shakespeare):
    from dblocks.text import VOCAB, load_text_split

    ref = load_text_split(32, 0)
    assert shakespeare.card.vocabulary == VOCAB and shakespeare.card.chunk == 4096
    assert torch.equal(shakespeare.split("validation", seq_len=32)[0], ref.val)
    assert torch.equal(shakespeare.split("test", seq_len=32)[0], ref.test)
    assert torch.equal(shakespeare.split("train", seq_len=32, limit=1000)[0], ref.train[:1000])


def test_train_shards_count_windows_from_the_footer(shakespeare):
    shards = shakespeare.train_shards(seq_len=32)
    assert len(shards) == 5 and sum(s.rows for s in shards) == len(shakespeare.split("train", seq_len=32)[0])
    (w,) = shakespeare.read_rows(shards[-1].path, 0, shards[-1].rows, seq_len=32)
    assert w.shape == (shards[-1].rows, 33)


def test_text_read_rows_across_row_groups_is_a_slice_of_the_split(shakespeare):
    first = shakespeare.train_shards(seq_len=32)[0]  # 256 chunks in row groups of 64: 64 * 127 windows each
    (all_rows,) = shakespeare.split("train", seq_len=32, limit=first.rows)
    (rows,) = shakespeare.read_rows(first.path, 8000, 8300, seq_len=32)
    assert torch.equal(rows, all_rows[8000:8300])


# ---- images ------------------------------------------------------------------------------------------------
def test_labelled_rgb_folder_resized_to_image_size(tmp_path, rgb_folder):
    card = prep(tmp_path, rgb_folder, image_size=16, test_size=0.25, rows_per_shard=5)
    assert card.shape == (3, 16, 16) and card.classes == ("cat", "dog", "eel") and card.pixel_dtype == "uint8"
    assert (card.rows("train"), card.rows("test")) == (16, 6) and card.name == "rgb"
    ds = open_dataset(str(tmp_path / "out"))
    x, y = ds.split("train")
    assert x.shape == (16, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    bright = x.flatten(2).amax(2).argmax(1)  # the brightest channel of each image is its class's colour
    assert torch.equal(bright, y)
    assert card.content_hash == card_hash(all_shards(card))


def test_flat_grey_folder_is_unlabelled_and_exact(tmp_path):
    files = [draw(tmp_path / "grey" / f"{i:02d}.png", (28, 28), mode="L", color=(i * 20,), seed=i) for i in range(12)]
    card = prep(tmp_path, tmp_path / "grey", test_size=3)
    assert card.shape == (1, 28, 28) and card.classes == () and not card.labelled
    pixels = torch.tensor(np.stack([np.asarray(Image.open(f)) for f in files]), dtype=torch.float32)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    x, y = open_dataset(str(tmp_path / "out")).split("test")
    assert torch.equal(x[:, 0], pixels[perm[:3]] * (2 / 255) - 1) and torch.equal(y, torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_npz_channel_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 3, 6, 5), dtype=np.uint8)
    y = rng.integers(0, 4, 40)
    path = npz(tmp_path, x=x.transpose(0, 2, 3, 1) if layout == "channels_last" else x, y=y)
    card = prep(tmp_path, path, test_size=10, shards=3)
    assert card.shape == (3, 6, 5) and card.classes == ("0", "1", "2", "3") and card.scale == 2 / 255
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    ds = open_dataset(str(tmp_path / "out"))
    got_x, got_y = ds.split("train")
    assert torch.equal(got_x, torch.from_numpy(x).float()[perm[10:]] * (2 / 255) - 1)
    assert torch.equal(got_y, torch.from_numpy(y)[perm[10:]])
    assert [s.rows for s in ds.train_shards()] == [10, 10, 10]


@pytest.mark.parametrize("lo, scale, offset", [(0.0, 2.0, -1.0), (-1.0, 1.0, 0.0)])
def test_npz_float_ranges(tmp_path, lo, scale, offset):
    x = np.linspace(lo, 1, 20 * 64, dtype=np.float32).reshape(20, 8, 8)
    card = prep(tmp_path, npz(tmp_path, x=x), test_size=0.1)
    assert (card.pixel_dtype, card.scale, card.offset, card.rows("test")) == ("float32", scale, offset, 2)
    got, _ = open_dataset(str(tmp_path / "out")).split("train")
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got[:, 0], torch.from_numpy(x)[perm[2:]] * scale + offset)


def test_image_read_rows_across_row_groups_is_a_slice_of_the_split(tmp_path, monkeypatch):
    monkeypatch.setitem(dataset.ROW_GROUP_ROWS, "images", 16)
    x = np.random.default_rng(0).integers(0, 256, (100, 4, 4), dtype=np.uint8)
    prep(tmp_path, npz(tmp_path, x=x, y=np.arange(100) % 3), test_size=0.2, shards=1)
    ds = open_dataset(str(tmp_path / "out"))
    path = ds.card.splits["train"].shards[0].path
    assert pq.ParquetFile(tmp_path / "out" / path).num_row_groups == 5
    whole = ds.split("train")
    for a, b in zip(ds.read_rows(path, 13, 50), whole):
        assert torch.equal(a, b[13:50])
    assert all(torch.equal(a, b[:7]) for a, b in zip(ds.split("train", limit=7), whole))


# ---- text --------------------------------------------------------------------------------------------------
def write_docs(folder: Path) -> list[str]:
    docs = ["the quick brown fox jumps over the lazy dog\n" * 3, "Ünïcödé — text, twice!\n" * 4, "short"]
    for i, d in enumerate(docs):
        (folder / "sub" if i == 1 else folder).mkdir(parents=True, exist_ok=True)
        (folder / ("sub" if i == 1 else "") / f"{'abc'[i]}.txt").write_text(d, encoding="utf-8")
    return [docs[0], docs[2], docs[1]]  # sorted paths: a.txt, c.txt, sub/b.txt


@pytest.mark.parametrize("vocabulary", ["char", "byte"])
def test_text_folder_chunks_stay_within_documents(tmp_path, vocabulary):
    docs = write_docs(tmp_path / "txt")
    card = prep(tmp_path, tmp_path / "txt", vocabulary=vocabulary, chunk=16, held_out=0.1)
    if vocabulary == "char":
        assert card.vocabulary == "".join(sorted(set("".join(docs)))) and not card.byte_level
        ids = [torch.tensor([card.vocabulary.index(c) for c in d]) for d in docs]
    else:
        assert card.byte_level and card.vocab_size == 256
        ids = [torch.tensor(list(d.encode("utf-8"))) for d in docs]
    chunks = [c for d in ids for c in d.split(16)]  # never across documents
    parts = split_chunks(len(chunks), 0, 0.1)
    ds = open_dataset(str(tmp_path / "out"))
    for name, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        want = text_windows([chunks[i] for i in parts[key]], 5)
        assert torch.equal(ds.split(name, seq_len=5)[0], want)
        assert card.rows(name) == len(parts[key])
    assert sum(s.rows for s in ds.train_shards(seq_len=5)) == sum(windows_in(len(chunks[i]), 5) for i in parts["train"])


# ---- idempotence and never losing data ---------------------------------------------------------------------
def test_preparing_again_is_a_no_op(tmp_path, rgb_folder, caplog):
    first = prep(tmp_path, rgb_folder, image_size=8)
    before = snapshot(tmp_path / "out")
    with caplog.at_level("INFO"):
        again = prep(tmp_path, rgb_folder, image_size=8)
    assert again == first and snapshot(tmp_path / "out") == before and "already prepared" in caplog.text


def test_a_missing_shard_is_restored_by_preparing_again(tmp_path, digits):
    root = tmp_path / "digits"
    before = snapshot(root)
    (root / "test" / "part-00001.parquet").unlink()
    with pytest.raises(DataError, match="part-00001.parquet: missing"):
        digits.verify()
    prepare(PrepareConfig(input="builtin:digits", output=str(root)))
    assert snapshot(root) == before


def test_refuses_to_overwrite_a_different_dataset(tmp_path, rgb_folder, digits):
    before = snapshot(tmp_path / "digits")
    with pytest.raises(DataError, match=r"output=.*digits already holds a dataset \(digits, hash [0-9a-f]{12}…\); "):
        prep(tmp_path, rgb_folder, out="digits", image_size=8)
    assert snapshot(tmp_path / "digits") == before


def test_refuses_an_unreadable_card_at_output(tmp_path, rgb_folder):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "card.json").write_text("{not json")
    with pytest.raises(DataError, match="already holds a card.json this dblocks cannot read"):
        prep(tmp_path, rgb_folder, image_size=8)
    assert (tmp_path / "out" / "card.json").read_text() == "{not json"


def test_a_prepared_input_is_validated_in_place(tmp_path, digits):
    card = prepare(PrepareConfig(input=str(tmp_path / "digits")))
    assert card == digits.card
    with pytest.raises(ConfigError, match="used where it is; omit output="):
        prepare(PrepareConfig(input=str(tmp_path / "digits"), output=str(tmp_path / "elsewhere")))


# ---- bad inputs: one line naming the file and the fix -------------------------------------------------------
def test_unreadable_image(tmp_path):
    draw(tmp_path / "im" / "a.png")
    (tmp_path / "im" / "b.png").write_bytes(b"\x89PNG not really" * 10)
    with pytest.raises(DataError, match=r"im/b\.png: not a readable image \(.*\); replace or remove it$"):
        prep(tmp_path, tmp_path / "im")


def test_truncated_image(tmp_path):
    good = draw(tmp_path / "im" / "a.png", (64, 64)).read_bytes()
    (tmp_path / "im" / "b.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"b\.png: not a readable image"):
        prep(tmp_path, tmp_path / "im")


def test_mixed_sizes_need_image_size(tmp_path):
    draw(tmp_path / "im" / "a.png", (10, 10))
    draw(tmp_path / "im" / "b.png", (12, 10))
    with pytest.raises(DataError, match="mixed image sizes: a.png is 10x10, b.png is 12x10; pass image_size=N"):
        prep(tmp_path, tmp_path / "im")
    assert prep(tmp_path, tmp_path / "im", image_size=6, test_size=1).shape == (3, 6, 6)


def test_mixed_channel_counts(tmp_path):
    draw(tmp_path / "im" / "a.png", mode="L", color=(90,))
    draw(tmp_path / "im" / "b.png", mode="RGB")
    with pytest.raises(DataError, match="mixed channel counts: a.png is grey, b.png is RGB; convert them to one mode"):
        prep(tmp_path, tmp_path / "im")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder; put images"):
        prep(tmp_path, tmp_path / "empty")


def test_empty_class_subfolder(tmp_path):
    draw(tmp_path / "im" / "cat" / "a.png")
    (tmp_path / "im" / "dog").mkdir()
    with pytest.raises(DataError, match=r"im/dog: class folder without images .*; add some or remove it"):
        prep(tmp_path, tmp_path / "im")


def test_images_beside_class_subfolders(tmp_path):
    draw(tmp_path / "im" / "cat" / "a.png")
    draw(tmp_path / "im" / "b.png")
    with pytest.raises(DataError, match=r"holds both images \(b.png\) and subfolders \(cat\)"):
        prep(tmp_path, tmp_path / "im")


def test_npz_negative_label(tmp_path):
    path = npz(tmp_path, x=np.zeros((5, 4, 4), np.uint8), y=np.array([0, 1, 2, -1, 0]))
    with pytest.raises(DataError, match=r"a\.npz: y\[3\] = -1; labels must be integers 0\.\.K-1"):
        prep(tmp_path, path)


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_npz_non_finite_pixels(tmp_path, bad, what):
    x = np.zeros((5, 4, 4), np.float32)
    x[2, 1, 3] = bad
    with pytest.raises(DataError, match=rf"a\.npz: x\[2\] holds {what}; fix or drop that image"):
        prep(tmp_path, npz(tmp_path, x=x))


def test_npz_float_pixels_out_of_range(tmp_path):
    x = np.zeros((5, 4, 4), np.float32)
    x[3, 0, 0] = 255.0
    with pytest.raises(DataError, match=r"x\[3\] holds 255; float pixels must lie in \[0, 1\] or \[-1, 1\]"):
        prep(tmp_path, npz(tmp_path, x=x))


def test_npz_without_x(tmp_path):
    with pytest.raises(DataError, match=r"a\.npz: no array 'x' \(it has images\); save the images as x"):
        prep(tmp_path, npz(tmp_path, images=np.zeros((5, 4, 4), np.uint8)))


@pytest.mark.parametrize("shape", [(5, 16), (5, 4, 4, 2), (5, 1, 2, 3, 4)])
def test_npz_x_of_wrong_shape(tmp_path, shape):
    with pytest.raises(DataError, match=r"x has shape .*; images need shape \(N, H, W\)"):
        prep(tmp_path, npz(tmp_path, x=np.zeros(shape, np.uint8)))


def test_npz_y_length(tmp_path):
    with pytest.raises(DataError, match=r"y has shape \(4,\) for 5 images in x"):
        prep(tmp_path, npz(tmp_path, x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(4, np.int64)))


def test_npz_integer_pixels_other_than_uint8(tmp_path):
    with pytest.raises(DataError, match="x has dtype int64; save uint8 pixels"):
        prep(tmp_path, npz(tmp_path, x=np.zeros((5, 4, 4), np.int64)))


def test_text_not_utf8(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("fine text\n")
    (tmp_path / "txt" / "b.txt").write_bytes(b"hello\xff\xfeworld")
    with pytest.raises(DataError, match=r"txt/b\.txt: not UTF-8 at byte 5 \(.*\); save it as UTF-8"):
        prep(tmp_path, tmp_path / "txt")


def test_text_folder_without_text(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "notes.md").write_text("# not text input\n")
    with pytest.raises(DataError, match="no .txt files; put UTF-8 .txt files in it"):
        prep(tmp_path, tmp_path / "txt", kind="text")
    (tmp_path / "txt" / "a.txt").write_text("")
    with pytest.raises(DataError, match="its 1 .txt files are empty"):
        prep(tmp_path, tmp_path / "txt")


def test_input_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=r"input=.*/nowhere does not exist; give a folder of images"):
        prep(tmp_path, tmp_path / "nowhere")


def test_bad_options(tmp_path, rgb_folder):
    with pytest.raises(ConfigError, match="the built-in sets are builtin:digits, builtin:shakespeare"):
        prepare(PrepareConfig(input="builtin:cifar", output=str(tmp_path)))
    with pytest.raises(ConfigError, match="test_size=1.5: a fraction in"):
        prep(tmp_path, rgb_folder, image_size=8, test_size=1.5)
    with pytest.raises(ConfigError, match="output= is required"):
        prepare(PrepareConfig(input=str(rgb_folder)))
    with pytest.raises(ConfigError, match="output= is required"):  # never into the current directory
        prepare(PrepareConfig(input="builtin:digits"))
    with pytest.raises(ConfigError, match="kind=pictures: one of auto, images, arrays, text, parquet"):
        prep(tmp_path, rgb_folder, kind="pictures")


# ---- bad prepared datasets: the reader names the shard and row ----------------------------------------------
def test_open_dataset_on_a_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"^data.path=.*/nope does not exist$"):
        open_dataset(str(tmp_path / "nope"))


def test_open_dataset_without_card(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(
        DataError, match=r"no card.json; not a prepared dataset \(prepare it: dblocks-data input=\.\.\."
    ):
        open_dataset(str(tmp_path / "d"))


def test_card_schema_version_mismatch(tmp_path, digits):
    card = json.loads((tmp_path / "digits" / "card.json").read_text())
    (tmp_path / "digits" / "card.json").write_text(json.dumps({**card, "schema_version": 99}))
    with pytest.raises(DataError, match="card.json: schema version 99, this dblocks reads version 1"):
        open_dataset(str(tmp_path / "digits"))


def test_changed_shard_fails_verify(tmp_path, digits):
    shard = tmp_path / "digits" / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"digits/train/part-00001\.parquet: content hash does not match card\.json"):
        digits.verify()
    with pytest.raises(DataError, match="content hash does not match"):  # nor does it pass as a prepared input
        prepare(PrepareConfig(input=str(tmp_path / "digits")))


def replace_shard(digits, rel: str, columns: dict) -> str:
    """Overwrite one shard of the digits with a hand-written table (same number of rows)."""
    pq.write_table(pa.table(columns).replace_schema_metadata(META), Path(digits.storage.path(rel)))
    return rel


def test_shard_image_column_of_wrong_dtype(digits):
    n, rel = 180, "test/part-00000.parquet"
    images = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 64)), 64)  # float64
    replace_shard(digits, rel, {"image": images, "label": pa.array(np.zeros(n, np.int64))})
    want = r"part-00000\.parquet: column image is fixed_size_list<double>\[64\], schema version 1 needs .*<uint8>\[64\]"
    with pytest.raises(DataError, match=want):
        digits.read_rows(rel, 0, 10)


def test_shard_image_list_of_wrong_length(digits):
    n, rel = 180, "test/part-00000.parquet"
    images = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 63, np.uint8)), 63)
    replace_shard(digits, rel, {"image": images, "label": pa.array(np.zeros(n, np.int64))})
    with pytest.raises(DataError, match=r"column image is fixed_size_list<uint8>\[63\], .* needs .*\[64\]"):
        digits.split("test")


def test_shard_label_of_wrong_dtype(digits):
    n, rel = 180, "test/part-00000.parquet"
    images = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 64, np.uint8)), 64)
    replace_shard(digits, rel, {"image": images, "label": pa.array(["3"] * n)})
    with pytest.raises(DataError, match="column label is string, schema version 1 needs int64"):
        digits.read_rows(rel, 0, 10)


def test_shard_label_outside_the_classes(digits):
    n, rel = 180, "test/part-00000.parquet"
    images = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 64, np.uint8)), 64)
    replace_shard(digits, rel, {"image": images, "label": pa.array(np.where(np.arange(n) == 42, 10, 1))})
    digits.read_rows(rel, 0, 40)  # the rows asked for are fine
    with pytest.raises(DataError, match=r"part-00000\.parquet row 42: label 10 is not one of card.json's 10 classes"):
        digits.read_rows(rel, 40, 50)


def test_shard_pixels_outside_the_model_range(digits):
    n, rel = 180, "test/part-00000.parquet"
    pixels = np.zeros((n, 64), np.uint8)
    pixels[7, 3] = 17  # 17 / 8 - 1 > 1
    images = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 64)
    replace_shard(digits, rel, {"image": images, "label": pa.array(np.zeros(n, np.int64))})
    with pytest.raises(DataError, match=r"row 7: pixel 1.125 after scale and offset is not in \[-1, 1\]"):
        digits.read_rows(rel, 0, 10)


def test_shard_without_schema_version(digits):
    rel = "test/part-00000.parquet"
    pq.write_table(pa.table({"x": [1]}), Path(digits.storage.path(rel)))
    with pytest.raises(DataError, match="part-00000.parquet: schema version none, this dblocks reads version 1"):
        digits.read_rows(rel, 0, 1)


def text_card(**kw) -> DataCard:
    fields = dict(kind="text", name="t", splits={}, content_hash="", vocabulary="abc", chunk=8) | kw
    return DataCard(**fields)


def test_text_token_outside_the_vocabulary(tmp_path):
    chunks = [np.array([0, 1, 2, 0, 1, 2, 0, 1]), np.array([0, 1, 7, 2])] * 2
    write_dataset(str(tmp_path / "t"), text_card(), {"train": chunks, "validation": [], "test": []})
    ds = open_dataset(str(tmp_path / "t"))
    with pytest.raises(DataError, match=r"train/part-00000\.parquet row 1: token id 7 is not in the vocabulary"):
        ds.split("train", seq_len=2)


def test_text_chunk_longer_than_the_card_says(tmp_path):
    chunks = [np.zeros(12, np.int32), np.zeros(3, np.int32)]
    write_dataset(str(tmp_path / "t"), text_card(), {"train": chunks, "validation": [], "test": []})
    with pytest.raises(
        DataError, match=r"part-00000\.parquet row 0: 12 ids, card.json's chunk is 8; prepare the dataset again$"
    ):
        open_dataset(str(tmp_path / "t")).validate()


def test_a_prepared_input_with_a_bad_row_is_rejected(tmp_path, digits):
    rel = "train/part-00000.parquet"
    images = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(718 * 64, np.uint8)), 64)
    replace_shard(digits, rel, {"image": images, "label": pa.array(np.full(718, -3))})
    card = json.loads((tmp_path / "digits" / "card.json").read_text())  # make the card vouch for the new bytes
    shard = card["splits"]["train"]["shards"][0]
    data = (tmp_path / "digits" / rel).read_bytes()
    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (tmp_path / "digits" / "card.json").write_text(json.dumps(card))
    with pytest.raises(DataError, match=r"part-00000\.parquet row 0: label -3 is not one of"):
        prepare(PrepareConfig(input=str(tmp_path / "digits")))


# ---- the command --------------------------------------------------------------------------------------------
def test_command_prints_the_card_and_uri(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["input=builtin:digits", f"output={tmp_path / 'd'}"])
    out = capsys.readouterr().out.splitlines()
    assert out == ["images 1x8x8, 10 classes, 1437 train / 360 test", str(tmp_path / "d")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no outputs/ folder


def test_python_dash_m_runs_the_command(tmp_path):
    out = tmp_path / "d"
    args = [sys.executable, "-m", "coordinator.data", "input=builtin:digits", f"output={out}", "name=mine"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(out) and "wrote train: 1437 rows in 2 shards" in proc.stderr
    card = open_dataset(str(out)).card
    assert card.name == "mine" and card.source == "builtin:digits" and card.rows("test") == 360


@pytest.mark.parametrize(
    "args, message",
    [
        (["input=/no/such/dir", "output=/tmp/x"], "error: input=/no/such/dir does not exist"),
        (["input=builtin:digits", "output=/tmp/x", "colour=1"], "error: Could not override 'colour'"),
        (["input=builtin:digits", "output=/tmp/x", "shards=two"], "error: .*shards"),
    ],
)
def test_command_errors_are_one_line_and_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert re.match(message, err)


# ---- streaming: the worker's reader -----------------------------------------------------------------------
class CountingDataset:
    """A Dataset whose reads are counted, with the thread each ran on."""

    def __init__(self, data):
        self.data, self.reads = data, []

    def read_rows(self, path, start, end, *, seq_len=None):
        import threading

        self.reads.append(((path, start, end), threading.current_thread().name))
        return self.data.read_rows(path, start, end, seq_len=seq_len)


def test_the_prefetcher_reads_each_units_rows_once_the_next_on_its_thread(digits):
    from dblocks.units import make_units
    from worker.prefetch import RowPrefetcher

    shards = digits.train_shards()
    units = make_units(40, 10, shards, seed=0, block=0)  # 4 units over the 2 shards: a, b, a, b
    counting = CountingDataset(digits)
    with RowPrefetcher(counting, seq_len=None) as reader:
        for k, u in enumerate(units):
            rows = reader.rows(u)
            if k + 1 < len(units):
                reader.prefetch(units[k + 1])
            want = digits.read_rows(u.shard, u.row_start, u.row_end)
            assert all(torch.equal(a, b) for a, b in zip(rows, want))
    keys = [key for key, _ in counting.reads]
    assert keys == [(u.shard, u.row_start, u.row_end) for u in units]  # each unit's rows read once, in order
    assert all(thread.startswith("dblocks-prefetch") for _, thread in counting.reads)


def test_the_prefetcher_surfaces_a_bad_row_in_the_unit_that_needs_it(tmp_path, digits):
    from dblocks.units import WorkUnit
    from worker.prefetch import RowPrefetcher

    shard = digits.train_shards()[0]
    bad = WorkUnit(0, shard.path, 0, shard.rows + 1, 0, 1, 0)  # rows past the shard's end
    with RowPrefetcher(digits, seq_len=None) as reader:
        reader.prefetch(bad)
        with pytest.raises(ValueError, match=r"rows \[0, 719\) are outside its 718 rows"):
            reader.rows(bad)
