"""``dblocks-data`` / ``python -m coordinator.data input=<path> output=<uri> [options]``: prepare a dataset once.

Reads a folder of images (one subfolder per class, or a flat folder of unlabelled images), a ``.npz``
(``x`` images, optional ``y`` labels), UTF-8 ``.txt`` files (one document each) or a built-in set
(``builtin:digits``, ``builtin:shakespeare``), splits it and writes parquet shards and card.json
(worker/dataset.py) to ``output``, a local path or any pyarrow.fs URI. An input that is already a
prepared dataset is validated where it is. Preparing the same data to the same output again is a no-op;
a different dataset already there is never overwritten.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dblocks.config import ConfigError
from dblocks.datacard import DataCard, DataError
from dblocks.errors import one_line
from worker.dataset import open_dataset, write_dataset

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FILE_KINDS = {".npz": "arrays", ".txt": "text"}
SPLIT_NAMES = {"val": "validation"}  # dblocks.text.split_chunks' names -> the card's


@dataclass
class PrepareConfig:
    input: str = ""  # a folder, a .npz or .txt file, a prepared dataset, or builtin:digits | builtin:shakespeare
    output: str = ""  # where to write: a local path or any pyarrow.fs URI ("" only for a prepared input)
    kind: str = "auto"  # auto | images | arrays | parquet | text
    name: str | None = None  # the card's name; None: the input's basename
    image_size: int | None = None  # resize the shorter side and center-crop to NxN; None: one size for all
    test_size: float = 0.1  # images: a fraction in (0, 1) or a row count
    split_seed: int = 0
    shards: int | None = None  # shards per split; None: rows_per_shard
    rows_per_shard: int | None = None  # None: 10000 images, 256 text chunks
    vocabulary: str = "char"  # text: char | byte
    chunk: int = 4096  # text: token ids per row
    held_out: float = 0.02  # text: fraction of the chunks to validation, and again to test


@dataclass
class Images:
    pixels: np.ndarray  # (N, C, H, W) uint8 | float32
    labels: np.ndarray | None  # (N,) int64, None: unlabelled
    classes: tuple[str, ...]
    scale: float  # model input = pixel * scale + offset
    offset: float


@dataclass
class Text:
    docs: list[np.ndarray]  # int32 ids of each document
    vocabulary: str | None  # None: byte level


# ---- images --------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _image_files(root: Path) -> tuple[list[Path], list[int] | None, tuple[str, ...]]:
    """Image files, their labels and the class names: one subfolder per class, or a flat folder."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat = _images_in(root)
    if subdirs and flat:
        raise DataError(
            f"input={root} holds both images ({flat[0].name}) and subfolders ({subdirs[0].name}); "
            "put every image in a class subfolder, or use a flat folder of unlabelled images"
        )
    if flat:
        return flat, None, ()
    if not subdirs:
        raise DataError(f"input={root}: no images ({', '.join(IMAGE_SUFFIXES)}); add images or choose another input")
    files, labels = [], []
    for k, d in enumerate(subdirs):
        found = _images_in(d)
        if not found:
            raise DataError(f"{d}: class folder without images ({', '.join(IMAGE_SUFFIXES)}); add some or remove it")
        files += found
        labels += [k] * len(found)
    return files, labels, tuple(d.name for d in subdirs)


def _load_image(path: Path, size: int | None):
    """One image as a Pillow image in mode L or RGB, resized and center-cropped to size x size if asked."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if im.mode in ("L", "1") else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({one_line(e)}); replace or remove it") from None
    if size is None:
        return im
    w, h = im.size
    s = size / min(w, h)
    w, h = max(size, round(w * s)), max(size, round(h * s))
    left, top = (w - size) // 2, (h - size) // 2
    return im.resize((w, h), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))


def read_image_folder(cfg: PrepareConfig) -> Images:
    """A folder of PNG/JPEG/WebP images: all grey or all RGB, one size (or resized to image_size)."""
    root = Path(cfg.input)
    files, labels, classes = _image_files(root)
    first_mode, first_size, pixels = {}, None, []
    for f in files:
        im, rel = _load_image(f, cfg.image_size), f.relative_to(root)
        first_mode.setdefault(im.mode, rel)
        if len(first_mode) > 1:
            (a, ma), (b, mb) = ((p, "grey" if m == "L" else m) for m, p in first_mode.items())
            raise DataError(f"mixed channel counts: {a} is {ma}, {b} is {mb}; convert them to one mode")
        first_size = first_size or (rel, im.size)
        if im.size != first_size[1]:
            raise DataError(
                f"mixed image sizes: {first_size[0]} is {'x'.join(map(str, first_size[1]))}, {rel} is "
                f"{'x'.join(map(str, im.size))}; pass image_size=N to resize and center-crop all to NxN"
            )
        a = np.asarray(im, dtype=np.uint8)
        pixels.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    return Images(np.stack(pixels), y, classes, 2 / 255, -1.0)


# ---- arrays --------------------------------------------------------------------------------------------
def _channels_first(path: Path, x: np.ndarray) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3 -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise DataError(
        f"{path}: x has shape {x.shape}; images need shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
    )


def _pixels(path: Path, x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Pixels and their (scale, offset) to [-1, 1]: uint8 0..255, or floats in [0, 1] or [-1, 1]."""
    if x.dtype == np.uint8:
        return x, 2 / 255, -1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: x has dtype {x.dtype}; save uint8 pixels (0..255) or floats in [0, 1] or [-1, 1]")
    flat = x.reshape(len(x), -1)
    finite = np.isfinite(flat)
    if not finite.all():
        r = int(np.argmax(~finite.all(1)))
        what = "NaN" if np.isnan(flat[r]).any() else "Inf"
        raise DataError(f"{path}: x[{r}] holds {what}; fix or drop that image")
    lo, hi = float(flat.min()), float(flat.max())
    if lo >= 0 and hi <= 1:
        return x.astype(np.float32), 2.0, -1.0
    if lo >= -1 and hi <= 1:
        return x.astype(np.float32), 1.0, 0.0
    r = int(np.argmax((np.abs(flat) > 1).any(1)))
    raise DataError(
        f"{path}: x[{r}] holds {flat[r][np.abs(flat[r]) > 1][0]:g}; float pixels must lie in [0, 1] or [-1, 1] "
        "(divide 0..255 values by 255)"
    )


def _labels(path: Path, y: np.ndarray | None, n: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Integer labels 0..K-1 (one per image) and class names "0".."K-1"."""
    if y is None:
        return None, ()
    if y.shape != (n,):
        raise DataError(f"{path}: y has shape {y.shape} for {n} images in x; save one label per image, shape ({n},)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has dtype {y.dtype}; labels must be integers 0..K-1")
    if (y < 0).any():
        r = int(np.argmax(y < 0))
        raise DataError(f"{path}: y[{r}] = {y[r]}; labels must be integers 0..K-1")
    return y.astype(np.int64), tuple(str(k) for k in range(int(y.max()) + 1))


def read_npz(cfg: PrepareConfig) -> Images:
    """``x`` (N, H, W) / (N, H, W, C) / (N, C, H, W), uint8 or float, and optional integer ``y`` (N,)."""
    path = Path(cfg.input)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz ({one_line(e)}); save it with numpy.savez") from None
    if "x" not in arrays:
        raise DataError(
            f"{path}: no array 'x' (it has {', '.join(arrays) or 'none'}); save the images as x, "
            "shape (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    if len(arrays["x"]) == 0:
        raise DataError(f"{path}: x holds no images")
    pixels, scale, offset = _pixels(path, _channels_first(path, arrays["x"]))
    labels, classes = _labels(path, arrays.get("y"), len(pixels))
    return Images(np.ascontiguousarray(pixels), labels, classes, scale, offset)


# ---- text ----------------------------------------------------------------------------------------------
def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start} ({e.reason}); save it as UTF-8") from None


def encode_docs(docs: list[str], byte_level: bool) -> Text:
    """Documents -> ids: UTF-8 bytes, or the sorted unique characters of all of them (code point order)."""
    if byte_level:
        return Text([np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32) for d in docs], None)
    codes = [np.frombuffer(d.encode("utf-32-le"), "<u4") for d in docs]
    vocab = np.unique(np.concatenate(codes))
    return Text([np.searchsorted(vocab, c).astype(np.int32) for c in codes], "".join(map(chr, vocab)))


def read_text(cfg: PrepareConfig) -> Text:
    """One ``.txt`` file, or every ``.txt`` under a folder (sorted): UTF-8, one document each."""
    root = Path(cfg.input)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*.txt") if f.is_file())
    if not files:
        raise DataError(f"input={root}: no .txt files; put UTF-8 .txt files in it")
    docs = [d for d in map(_decode, files) if d]
    if not docs:
        raise DataError(f"input={root}: its {len(files)} .txt files are empty")
    return encode_docs(docs, cfg.vocabulary == "byte")


# ---- built-in sets -------------------------------------------------------------------------------------
def builtin_digits(cfg: PrepareConfig) -> tuple[PrepareConfig, Images]:
    """scikit-learn's digits: grey levels 0..16 as uint8, v / 8 - 1 as ``dblocks.data.load_digits_split``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    cfg = dataclasses.replace(
        cfg, name=cfg.name or "digits", test_size=360, split_seed=0, shards=2, rows_per_shard=None
    )
    classes = tuple(str(k) for k in range(10))
    return cfg, Images(d.images.astype(np.uint8)[:, None], d.target.astype(np.int64), classes, 0.125, -1.0)


def builtin_shakespeare(cfg: PrepareConfig) -> tuple[PrepareConfig, Text]:
    """Shakespeare's plays (``dblocks.text.load_corpus``) as one document, character level."""
    from dblocks.text import CHUNK, load_corpus

    fixed = dict(vocabulary="char", chunk=CHUNK, held_out=0.02, split_seed=0, shards=None, rows_per_shard=256)
    cfg = dataclasses.replace(cfg, name=cfg.name or "shakespeare", **fixed)
    return cfg, encode_docs([load_corpus()], byte_level=False)


BUILTINS: dict[str, Callable] = {"builtin:digits": builtin_digits, "builtin:shakespeare": builtin_shakespeare}


# ---- splitting and writing -----------------------------------------------------------------------------
def _test_rows(test_size: float, n: int) -> int:
    if 0 < test_size < 1:
        return min(max(1, round(test_size * n)), n - 1)
    if test_size == int(test_size) and 0 <= test_size < n:
        return int(test_size)
    raise ConfigError(f"test_size={test_size}: a fraction in (0, 1) or a row count below the {n} rows")


def write_images(cfg: PrepareConfig, data: Images) -> DataCard:
    """Split the images (test = the first test_size of a seeded permutation, train = the rest) and write them."""
    n, shape = len(data.pixels), tuple(int(s) for s in data.pixels.shape[1:])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed)).numpy()
    k = _test_rows(cfg.test_size, n)
    flat = data.pixels.reshape(n, -1)
    take = {"train": perm[k:], "test": perm[:k]}
    splits = {s: (flat[i], None if data.labels is None else data.labels[i]) for s, i in take.items()}
    fields = dict(shape=shape, pixel_dtype=str(data.pixels.dtype), scale=data.scale, offset=data.offset)
    card = _card(cfg, "images", **fields, classes=data.classes, extra={"test_size": k})
    return write_dataset(cfg.output, card, splits, shards=cfg.shards, rows_per_shard=cfg.rows_per_shard)


def write_text(cfg: PrepareConfig, data: Text) -> DataCard:
    """Cut each document into chunks, send held_out of them each to validation and test, and write them."""
    from dblocks.text import split_chunks

    chunks = [d[i : i + cfg.chunk] for d in data.docs for i in range(0, len(d), cfg.chunk)]
    if len(chunks) < 3:
        raise DataError(f"input={cfg.input}: only {len(chunks)} chunks of text, need 3 or more; lower chunk=")
    parts = split_chunks(len(chunks), cfg.split_seed, cfg.held_out)
    splits = {SPLIT_NAMES.get(s, s): [chunks[i] for i in idx] for s, idx in parts.items()}
    fields = dict(vocabulary=data.vocabulary, byte_level=data.vocabulary is None, chunk=cfg.chunk)
    card = _card(cfg, "text", **fields, extra={"held_out": cfg.held_out, "documents": len(data.docs)})
    return write_dataset(cfg.output, card, splits, shards=cfg.shards, rows_per_shard=cfg.rows_per_shard)


def _card(cfg: PrepareConfig, kind: str, **fields) -> DataCard:
    """The card before its splits and content hash are known."""
    name = cfg.name or Path(cfg.input.rstrip("/")).stem
    return DataCard(
        kind=kind, name=name, splits={}, content_hash="", source=cfg.input, split_seed=cfg.split_seed, **fields
    )


def check_prepared(cfg: PrepareConfig) -> DataCard:
    """An input that is already a prepared dataset: verified and every row read, used where it is."""
    if cfg.output and cfg.output.rstrip("/") != cfg.input.rstrip("/"):
        raise ConfigError(f"input={cfg.input} is a prepared dataset and is used where it is; omit output=")
    data = open_dataset(cfg.input)
    data.verify()
    data.validate()
    log.info("%s: a valid prepared dataset (%s, hash %s)", cfg.input, data.card.name, data.card.content_hash[:12])
    return data.card


def _writing(read: Callable, write: Callable) -> Callable[[PrepareConfig], DataCard]:
    return lambda cfg: write(cfg, read(cfg))


def write_builtin(cfg: PrepareConfig) -> DataCard:
    """A built-in set, with its fixed split."""
    cfg, data = BUILTINS[cfg.input](cfg)
    return {Images: write_images, Text: write_text}[type(data)](cfg, data)


KINDS: dict[str, Callable[[PrepareConfig], DataCard]] = {
    "images": _writing(read_image_folder, write_images),
    "arrays": _writing(read_npz, write_images),
    "text": _writing(read_text, write_text),
    "parquet": check_prepared,
    "builtin": write_builtin,
}


def detect(src: str) -> str:
    """The kind of an input: a folder of images, a .npz, .txt files, or a prepared dataset (card.json)."""
    path = Path(src)
    if "://" in src or (path / "card.json").is_file():
        return "parquet"
    if path.is_file():
        if path.suffix.lower() not in FILE_KINDS:
            raise DataError(
                f"input={src}: cannot tell what a {path.suffix or 'suffix-less'} file holds; use .npz or .txt"
            )
        return FILE_KINDS[path.suffix.lower()]
    files = [f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise DataError(f"input={src}: empty folder; put images (one subfolder per class) or .txt files in it")
    suffixes = {f.suffix.lower() for f in files}
    if suffixes & set(IMAGE_SUFFIXES):
        return "images"
    if ".txt" in suffixes:
        return "text"
    raise DataError(
        f"input={src}: no images ({', '.join(IMAGE_SUFFIXES)}), .txt files or card.json in it; "
        "a parquet dataset needs its card.json (prepare it with dblocks-data)"
    )


def _check_config(cfg: PrepareConfig) -> None:
    rules = [
        (bool(cfg.input), "input= is required: a folder, .npz, .txt, prepared dataset or builtin:<name>"),
        (cfg.kind in ("auto", *KINDS), f"kind={cfg.kind}: one of auto, images, arrays, text, parquet"),
        (cfg.vocabulary in ("char", "byte"), f"vocabulary={cfg.vocabulary}: char or byte"),
        (cfg.chunk >= 2, f"chunk={cfg.chunk}: at least 2 token ids per row"),
        (0 <= cfg.held_out < 0.5, f"held_out={cfg.held_out}: a fraction in [0, 0.5)"),
        (cfg.shards is None or cfg.shards >= 1, f"shards={cfg.shards}: at least 1"),
        (cfg.rows_per_shard is None or cfg.rows_per_shard >= 1, f"rows_per_shard={cfg.rows_per_shard}: at least 1"),
        (cfg.image_size is None or cfg.image_size >= 1, f"image_size={cfg.image_size}: at least 1 pixel"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


def prepare(cfg: PrepareConfig) -> DataCard:
    """Prepare ``cfg.input`` as a dataset at ``cfg.output`` (a no-op if it is there already); its card."""
    _check_config(cfg)
    builtin = cfg.input.startswith("builtin:")
    if builtin and cfg.input not in BUILTINS:
        raise ConfigError(f"input={cfg.input}: the built-in sets are {', '.join(BUILTINS)}")
    if not builtin and "://" not in cfg.input and not Path(cfg.input).exists():
        raise DataError(f"input={cfg.input} does not exist; give a folder of images, a .npz, .txt files or a dataset")
    kind = "builtin" if builtin else detect(cfg.input) if cfg.kind == "auto" else cfg.kind
    if kind != "parquet" and not cfg.output:
        raise ConfigError("output= is required: where to write the dataset (a local path or a pyarrow.fs URI)")
    return KINDS[kind](cfg)


# ---- command line --------------------------------------------------------------------------------------
def load_config(overrides: list[str]) -> PrepareConfig:
    """``key=value`` overrides on the PrepareConfig schema (Hydra compose: no output folder, no chdir)."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name="dblocks_data", node=PrepareConfig)
    try:
        with initialize(version_base="1.3", config_path=None):
            return OmegaConf.to_object(compose(config_name="dblocks_data", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from None


def main(argv: list[str] | None = None) -> None:
    from worker.storage import StorageError

    from .__main__ import fail, setup_logging

    setup_logging()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        card = prepare(cfg)
    except (DataError, ConfigError, StorageError) as e:
        fail(e)
    print(card.describe())
    print(cfg.output or cfg.input)


if __name__ == "__main__":
    main()
