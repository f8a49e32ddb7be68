"""Prepared datasets on storage: the parquet shards and ``card.json`` that ``dblocks-data`` writes once
and every worker streams (schema version 1, described in dblocks/datacard.py).

Layout: ``<uri>/card.json`` (written last: a dataset without one was never finished) beside
``<uri>/<split>/part-NNNNN.parquet``. Every shard's schema metadata carries ``dblocks.schema_version``;
a text shard's also carries ``dblocks.lengths`` (its chunks' lengths, JSON), so counting a shard's
windows reads only the parquet footer. A read touches only the row groups that overlap the rows asked
for, and validates them: a bad row fails with the shard's URI, the row and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from dblocks.datacard import (
    SCHEMA_VERSION,
    SPLITS,
    DataCard,
    DataError,
    ShardInfo,
    SplitInfo,
    all_shards,
    card_hash,
    text_windows,
    windows_in,
)
from dblocks.errors import one_line
from dblocks.units import Shard

from .storage import Storage

log = logging.getLogger(__name__)
CARD = "card.json"
VERSION_KEY, LENGTHS_KEY = b"dblocks.schema_version", b"dblocks.lengths"
ROW_GROUP_ROWS = {"images": 1024, "text": 64}  # rows per parquet row group: the unit a read fetches
ROWS_PER_SHARD = {"images": 10_000, "text": 256}
AGAIN = "prepare the dataset again"
PIXEL_TYPES = {"uint8": pa.uint8(), "float32": pa.float32()}


class Dataset:
    """A prepared dataset: its card, and validated reads of its shards' rows."""

    def __init__(self, root: str, card: DataCard, storage: Storage):
        self.root, self.card, self.storage = root, card, storage
        self._rows = {s.path: s.rows for s in all_shards(card)}
        self._lengths: dict[str, np.ndarray] = {}
        self._read = {"images": self._image_rows, "text": self._text_rows}[card.kind]
        self._check = {"images": self._image_rows, "text": self._chunks}[card.kind]  # parquet rows, validated

    def verify(self) -> None:
        """Every shard of the card exists with the card's size and sha256."""
        for s in all_shards(self.card):
            uri, info = self.storage.uri(s.path), self.storage.fs.get_file_info(self.storage.path(s.path))
            if info.type != pafs.FileType.File:
                raise DataError(f"{uri}: missing (card.json lists it); {AGAIN}")
            if info.size != s.bytes or _sha256(self.storage, s.path) != s.sha256:
                raise DataError(
                    f"{uri}: content hash does not match card.json (the shard changed after it was prepared); {AGAIN}"
                )

    def validate(self) -> None:
        """Read every row of every shard through the reader's checks (shards are not kept in memory)."""
        for s in all_shards(self.card):
            for lo in range(0, s.rows, 4096):
                self._check(s.path, lo, min(s.rows, lo + 4096))

    def train_shards(self, seq_len: int | None = None) -> list[Shard]:
        """The train split's shards with their training rows: images, or (seq_len + 1)-windows of text."""
        shards = [Shard(s.path, self._training_rows(s.path, seq_len)) for s in self.card.splits["train"].shards]
        return [s for s in shards if s.rows]

    def read_rows(self, path: str, start: int, end: int, *, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """Training rows [start, end) of one shard: (x (n, C, H, W) float32, y (n,) int64) or (windows (n, T + 1),)."""
        rows = self._training_rows(path, seq_len)
        if not 0 <= start <= end <= rows:
            raise ValueError(f"{self.storage.uri(path)}: rows [{start}, {end}) are outside its {rows} rows")
        return self._read(path, start, end, seq_len)

    def split(self, name: str, *, limit: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """A whole split, or its first ``limit`` rows (images, or text windows)."""
        if name not in self.card.splits:
            raise DataError(f"{self.root}: no split {name!r} (it has {', '.join(self.card.splits)})")
        left, parts = float("inf") if limit is None else limit, []
        for s in self.card.splits[name].shards:
            n = int(min(left, self._training_rows(s.path, seq_len)))
            if n:
                parts.append(self.read_rows(s.path, 0, n, seq_len=seq_len))
                left -= n
            if left <= 0:
                break
        return tuple(torch.cat(cols) for cols in zip(*parts)) if parts else self._empty(seq_len)

    def _empty(self, seq_len: int | None) -> tuple[torch.Tensor, ...]:
        if self.card.kind == "images":
            return torch.zeros(0, *self.card.shape), torch.zeros(0, dtype=torch.int64)
        return (torch.zeros(0, seq_len + 1, dtype=torch.int64),)

    # ---- reading ------------------------------------------------------------------------------------
    def _training_rows(self, path: str, seq_len: int | None) -> int:
        if self.card.kind == "images":
            return self._rows[path] if path in self._rows else self._file(path).metadata.num_rows
        if seq_len is None or seq_len < 1:
            raise ValueError(f"{self.root}: a text dataset is read in (seq_len + 1)-windows; pass seq_len >= 1")
        return sum(windows_in(int(n), seq_len) for n in self._chunk_lengths(path))

    def _file(self, path: str) -> pq.ParquetFile:
        """The shard's parquet file (footer read, nothing else), its schema version and row count checked."""
        uri = self.storage.uri(path)
        try:
            f = pq.ParquetFile(self.storage.fs.open_input_file(self.storage.path(path)))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{uri}: not a readable parquet file ({one_line(e)}); {AGAIN}") from None
        version = (f.schema_arrow.metadata or {}).get(VERSION_KEY, b"none").decode()
        if version != str(SCHEMA_VERSION):
            raise DataError(f"{uri}: schema version {version}, this dblocks reads version {SCHEMA_VERSION}; {AGAIN}")
        if path in self._rows and f.metadata.num_rows != self._rows[path]:
            raise DataError(f"{uri}: {f.metadata.num_rows} rows, card.json says {self._rows[path]}; {AGAIN}")
        return f

    def _rows_of(self, path: str, start: int, end: int) -> tuple[pa.Table, str]:
        """Parquet rows [start, end) of a shard, reading only the row groups that overlap them."""
        f, uri = self._file(path), self.storage.uri(path)
        columns = {"images": ["image", "label"][: 1 + self.card.labelled], "text": ["ids"]}[self.card.kind]
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise DataError(f"{uri}: no column {missing[0]!r} (it has {', '.join(f.schema_arrow.names)}); {AGAIN}")
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        bounds = np.cumsum([0] + sizes)
        groups = [i for i in range(len(sizes)) if bounds[i] < end and bounds[i + 1] > start]
        if not groups:
            return f.schema_arrow.empty_table().select(columns), uri
        table = f.read_row_groups(groups, columns=columns)
        return table.slice(start - int(bounds[groups[0]]), end - start), uri

    def _image_rows(self, path: str, start: int, end: int, seq_len=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.card
        table, uri = self._rows_of(path, start, end)
        want = pa.list_(PIXEL_TYPES[c.pixel_dtype], int(np.prod(c.shape)))
        image = _column(table, "image", want, uri, start)
        pixels = image.flatten().to_numpy(zero_copy_only=False).reshape(len(table), *c.shape)
        x = torch.from_numpy(pixels.copy()).float() * c.scale + c.offset
        bad = ~(torch.isfinite(x) & (x.abs() <= 1 + 1e-6)).flatten(1)
        _check_rows(
            bad.any(1).numpy(),
            uri,
            start,
            lambda r: f"pixel {x[r].flatten()[bad[r]][0]:g} after scale and offset is not in [-1, 1]",
        )
        if not c.labelled:
            return x, torch.zeros(len(x), dtype=torch.int64)
        y = _column(table, "label", pa.int64(), uri, start).to_numpy()
        what = f"is not one of card.json's {c.num_classes} classes (0..{c.num_classes - 1})"
        _check_rows((y < 0) | (y >= c.num_classes), uri, start, lambda r: f"label {y[r]} {what}")
        return x, torch.from_numpy(y.astype(np.int64))

    def _text_rows(self, path: str, start: int, end: int, seq_len: int) -> tuple[torch.Tensor]:
        per = [windows_in(int(n), seq_len) for n in self._chunk_lengths(path)]
        first = np.cumsum([0] + per)  # first window of each chunk
        rows = [r for r in range(len(per)) if first[r] < end and first[r + 1] > start]
        if not rows:
            return self._empty(seq_len)
        chunks = self._chunks(path, rows[0], rows[-1] + 1)
        skip = int(first[rows[0]])
        return (text_windows(chunks, seq_len)[start - skip : end - skip],)

    def _chunk_lengths(self, path: str) -> np.ndarray:
        """Each chunk's length, from the shard's footer."""
        if path not in self._lengths:
            meta = self._file(path).schema_arrow.metadata or {}
            if LENGTHS_KEY not in meta:
                raise DataError(f"{self.storage.uri(path)}: no {LENGTHS_KEY.decode()} in its schema metadata; {AGAIN}")
            self._lengths[path] = np.asarray(json.loads(meta[LENGTHS_KEY]), dtype=np.int64)
        return self._lengths[path]

    def _chunks(self, path: str, start: int, end: int) -> list[torch.Tensor]:
        """Chunks (rows) [start, end) of a text shard as int64 id tensors, validated."""
        table, uri = self._rows_of(path, start, end)
        ids = _column(table, "ids", pa.list_(pa.int32()), uri, start)
        lengths = pc.list_value_length(ids).to_numpy()
        footer = self._chunk_lengths(path)[start:end]
        _check_rows(lengths != footer, uri, start, lambda r: f"{lengths[r]} ids, its footer lists {footer[r]}")
        _check_rows(
            lengths > self.card.chunk, uri, start, lambda r: f"{lengths[r]} ids, card.json's chunk is {self.card.chunk}"
        )
        values = ids.flatten().to_numpy().astype(np.int64)
        bad = np.flatnonzero((values < 0) | (values >= self.card.vocab_size))[:1]  # the first bad id
        rows = np.isin(np.arange(len(lengths)), np.searchsorted(np.cumsum(lengths), bad, side="right"))
        what = f"is not in the vocabulary (0..{self.card.vocab_size - 1})"
        _check_rows(rows, uri, start, lambda r: f"token id {values[bad[0]]} {what}")
        return list(torch.from_numpy(values).split(lengths.tolist()))


def _column(table: pa.Table, name: str, want: pa.DataType, uri: str, start: int) -> pa.Array:
    """One column as a single array of type ``want``, without nulls."""
    col = table.column(name)
    if _type_name(col.type) != _type_name(want):
        raise DataError(
            f"{uri}: column {name} is {_type_name(col.type)}, schema version {SCHEMA_VERSION} needs "
            f"{_type_name(want)}; {AGAIN}"
        )
    col = col.combine_chunks()
    if col.null_count:
        r = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{uri} row {start + r}: {name} is null; {AGAIN}")
    return col


def _check_rows(bad: np.ndarray, uri: str, start: int, what: Callable[[int], str]) -> None:
    """Fail at the first row r where ``bad`` holds; ``what(r)`` says what is wrong with it."""
    if bad.any():
        r = int(np.argmax(bad))
        raise DataError(f"{uri} row {start + r}: {what(r)}; {AGAIN}")


def _type_name(t: pa.DataType) -> str:
    """A column type as the schema documents it, whatever its list field is called."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{t.value_type}>[{t.list_size}]"
    return f"list<{t.value_type}>" if pa.types.is_list(t) else str(t)


def _sha256(storage: Storage, rel: str) -> str:
    h = hashlib.sha256()
    with storage.fs.open_input_stream(storage.path(rel)) as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def open_dataset(uri: str) -> Dataset:
    """The prepared dataset at ``uri`` (its card read and checked; the shards are read on demand)."""
    storage = Storage(uri)
    if storage.fs.get_file_info(storage.path("").rstrip("/") or "/").type == pafs.FileType.NotFound:
        raise DataError(f"data.path={uri} does not exist")
    if not storage.exists(CARD):
        raise DataError(
            f"{uri}: no card.json; not a prepared dataset (prepare it: dblocks-data input=... output={uri})"
        )
    card = DataCard.from_json(storage.read_bytes(CARD).decode("utf-8", errors="replace"), storage.uri(CARD))
    return Dataset(uri, card, storage)


# ---- writing ------------------------------------------------------------------------------------------
def _image_table(rows: tuple[np.ndarray, np.ndarray | None], lo: int, hi: int) -> pa.Table:
    """Images (pixels (N, C*H*W) uint8 | float32, labels (N,) | None) rows [lo, hi) as a shard table."""
    pixels, labels = rows
    flat = pa.array(np.ascontiguousarray(pixels[lo:hi]).reshape(-1))
    columns = {"image": pa.FixedSizeListArray.from_arrays(flat, pixels.shape[1])}
    if labels is not None:
        columns["label"] = pa.array(labels[lo:hi].astype(np.int64))
    return pa.table(columns).replace_schema_metadata({VERSION_KEY: str(SCHEMA_VERSION)})


def _text_table(chunks: list[np.ndarray], lo: int, hi: int) -> pa.Table:
    """Text chunks [lo, hi) (1-D id arrays) as a shard table, their lengths in the footer."""
    part = chunks[lo:hi]
    lengths = [len(c) for c in part]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.concatenate(part).astype(np.int32) if part else np.zeros(0, np.int32))
    meta = {VERSION_KEY: str(SCHEMA_VERSION), LENGTHS_KEY: json.dumps(lengths)}
    return pa.table({"ids": pa.ListArray.from_arrays(offsets, values)}).replace_schema_metadata(meta)


WRITERS: dict[str, tuple[Callable, Callable]] = {  # kind -> (number of rows, shard table of rows [lo, hi))
    "images": (lambda rows: len(rows[0]), _image_table),
    "text": (len, _text_table),
}


def shard_bounds(n: int, shards: int | None = None, rows_per_shard: int = 10_000) -> list[tuple[int, int]]:
    """Row ranges of ``shards`` (else ceil(n / rows_per_shard)) contiguous shards of n rows, none empty."""
    k = min(n, shards or -(-n // rows_per_shard))
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(k)]


def write_dataset(
    uri: str, card: DataCard, splits: dict, *, shards: int | None = None, rows_per_shard: int | None = None
) -> DataCard:
    """Write ``splits`` (split name -> images (pixels (N, C*H*W), labels | None) or text chunks [1-D ids])
    as shards under ``uri``, then ``card`` (its splits and content hash filled in) as card.json.

    If ``uri`` already holds a dataset: the same content is a no-op (a shard that went missing is
    restored), different content is refused; nothing of it is overwritten.
    """
    storage = Storage(uri)
    old = _existing(storage, uri)
    count, table = WRITERS[card.kind]
    infos = {}
    for name in SPLITS[card.kind]:
        rows, per = splits[name], rows_per_shard or ROWS_PER_SHARD[card.kind]
        bounds = shard_bounds(count(rows), shards, per)
        parts = [
            _put(storage, f"{name}/part-{i:05d}.parquet", table(rows, lo, hi), card.kind, old, uri)
            for i, (lo, hi) in enumerate(bounds)
        ]
        infos[name] = SplitInfo(count(rows), tuple(parts))
        log.info("%s %s: %d rows in %d shards", "checked" if old else "wrote", name, count(rows), len(parts))
    new = dataclasses.replace(card, splits=infos, schema_version=SCHEMA_VERSION)
    new = dataclasses.replace(new, content_hash=card_hash(all_shards(new)))
    if old is None:
        storage.write_bytes(CARD, new.to_json().encode())
        return new
    if old.content_hash != new.content_hash:
        raise _refusal(uri, old)
    log.info("%s: already prepared (%s, hash %s)", uri, old.name, old.content_hash[:12])
    return old


def _existing(storage: Storage, uri: str) -> DataCard | None:
    """The card of a dataset already at ``uri``, if any."""
    if not storage.exists(CARD):
        return None
    try:
        return DataCard.from_json(storage.read_bytes(CARD).decode("utf-8", errors="replace"), storage.uri(CARD))
    except DataError as e:
        raise DataError(
            f"output={uri} already holds a card.json this dblocks cannot read ({one_line(e)}); "
            "choose another output or delete it first"
        ) from None


def _refusal(uri: str, old: DataCard) -> DataError:
    return DataError(
        f"output={uri} already holds a dataset ({old.name}, hash {old.content_hash[:12]}…); "
        "choose another output or delete it first"
    )


def _put(storage: Storage, rel: str, table: pa.Table, kind: str, old: DataCard | None, uri: str) -> ShardInfo:
    """Write one shard; over an existing dataset only restore a shard it lists with these very bytes."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS[kind])
    data = buf.getvalue().to_pybytes()
    info = ShardInfo(rel, table.num_rows, len(data), hashlib.sha256(data).hexdigest())
    if old is None:
        storage.write_bytes(rel, data)
        return info
    listed = next((s for s in all_shards(old) if s.path == rel), None)
    if listed != info:
        raise _refusal(uri, old)
    if not storage.exists(rel) or _sha256(storage, rel) != info.sha256:
        log.warning("%s: restoring a damaged shard", storage.uri(rel))
        storage.write_bytes(rel, data)
    return info
