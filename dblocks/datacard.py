"""The dataset card: what a prepared dataset holds, read by every process that touches the data.

A prepared dataset (``dblocks-data``, coordinator/data.py) is a folder on a local path or any
pyarrow.fs URI: ``card.json`` beside parquet shards ``<split>/part-NNNNN.parquet``. The card is
written last, so a dataset without one was never finished. The shards' schema (version
``SCHEMA_VERSION``; worker/dataset.py reads and writes it):

- images: ``image`` fixed_size_list<uint8 | float32>[C*H*W] in C, H, W order, and ``label`` int64
  (absent for unlabelled images). The model sees ``pixel * scale + offset``, in [-1, 1].
- text: ``ids`` list<int32>, one chunk of ``chunk`` token ids per row (the last chunk of a document
  may be shorter); the schema metadata ``dblocks.lengths`` lists the chunks' lengths, so a shard's
  windows are counted from its footer. A model with context T trains on the non-overlapping
  (T + 1)-windows of each chunk.

This module is plain Python (no pyarrow): the families read shapes, classes and the vocabulary here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

SCHEMA_VERSION = 1
KINDS = ("images", "text")
SPLITS = {"images": ("train", "test"), "text": ("train", "validation", "test")}


class DataError(ValueError):
    """Bad data: the message names the file, shard or row and says how to fix it."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root, e.g. train/part-00000.parquet
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class DataCard:
    kind: str  # images | text
    name: str
    splits: dict[str, SplitInfo]
    content_hash: str  # sha256 over the shards' sha256 in split, then path order
    source: str = ""  # what it was prepared from
    split_seed: int = 0
    schema_version: int = SCHEMA_VERSION
    # images
    shape: tuple[int, int, int] | None = None  # C, H, W
    pixel_dtype: str | None = None  # uint8 | float32
    scale: float = 1.0  # model input = pixel * scale + offset
    offset: float = 0.0
    classes: tuple[str, ...] = ()  # class names, label k = classes[k]; () = unlabelled
    # text
    vocabulary: str | None = None  # character level: the characters in id order
    byte_level: bool = False  # byte level: ids are UTF-8 bytes 0..255
    chunk: int | None = None  # token ids per row
    extra: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def vocab_size(self) -> int:
        return 256 if self.byte_level else len(self.vocabulary or "")

    def rows(self, split: str) -> int:
        return self.splits[split].rows

    def describe(self) -> str:
        """One line: ``images 3x32x32, 10 classes, 50000 train / 10000 test``."""
        what = (
            f"images {'x'.join(map(str, self.shape))}, "
            + (f"{self.num_classes} classes" if self.labelled else "unlabelled")
            if self.kind == "images"
            else f"text, {'byte-level' if self.byte_level else 'character-level'} vocabulary of {self.vocab_size}"
        )
        return f"{what}, " + " / ".join(f"{s.rows} {name}" for name, s in self.splits.items())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "card.json") -> DataCard:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg} at line {e.lineno}); prepare the dataset again"
            ) from None
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version != SCHEMA_VERSION:
            raise DataError(
                f"{where}: schema version {version}, this dblocks reads version {SCHEMA_VERSION}; "
                "prepare the dataset again with this version's dblocks-data"
            )
        try:
            splits = {
                k: SplitInfo(v["rows"], tuple(ShardInfo(**s) for s in v["shards"])) for k, v in d.pop("splits").items()
            }
            card = cls(splits=splits, **d)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: not a dataset card ({e}); prepare the dataset again") from None
        shape = tuple(card.shape) if card.shape is not None else None
        object.__setattr__(card, "shape", shape)
        object.__setattr__(card, "classes", tuple(card.classes))
        if card.kind not in KINDS:
            raise DataError(f"{where}: kind {card.kind!r} is not one of {', '.join(KINDS)}")
        return card


def card_hash(shards: list[ShardInfo]) -> str:
    """The content hash of a dataset: sha256 over its shards' sha256, in the order given."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.path}:{s.sha256}\n".encode())
    return h.hexdigest()


def all_shards(card: DataCard) -> list[ShardInfo]:
    return [s for split in card.splits.values() for s in split.shards]


class SplitSource(Protocol):
    """A prepared dataset as the library reads it (worker/dataset.py's ``Dataset`` over parquet)."""

    card: DataCard

    def split(self, name: str, *, limit: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """A split's first ``limit`` rows: (images (N, C, H, W) in [-1, 1], labels (N,)) or
        (windows (N, seq_len + 1),) of text."""


# ---- text through a card's vocabulary ----------------------------------------------------------------
class Vocabulary:
    """Characters (or UTF-8 bytes) <-> ids."""

    def __init__(self, chars: str = "", *, byte_level: bool = False):
        self.byte_level, self.chars = byte_level, chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def of(cls, card: DataCard) -> Vocabulary:
        """The vocabulary a text dataset's card records."""
        return cls(card.vocabulary or "", byte_level=card.byte_level)

    def __len__(self) -> int:
        return 256 if self.byte_level else len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        if self.byte_level:
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
        missing = next((c for c in text if c not in self._ids), None)
        if missing is not None:
            raise DataError(f"character {missing!r} is not in the dataset's {len(self)}-character vocabulary")
        return torch.tensor([self._ids[c] for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        if self.byte_level:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return "".join(self.chars[int(i)] for i in ids)


def text_windows(chunks: list[torch.Tensor], seq_len: int) -> torch.Tensor:
    """The non-overlapping (seq_len + 1)-windows of each chunk, in order: (N, seq_len + 1) int64."""
    from .text import windows

    parts = [windows(c.long(), seq_len) for c in chunks]
    return torch.cat(parts) if parts else torch.zeros(0, seq_len + 1, dtype=torch.int64)


def windows_in(length: int, seq_len: int) -> int:
    """How many (seq_len + 1)-windows a chunk of ``length`` ids gives (``text.windows``)."""
    return max(0, (length - 1) // seq_len)
