"""Parquet shards of the training data (pyarrow), one row per example.

Image schema: ``pixels`` fixed_size_list<float32>[C*H*W] (values in [-1, 1]) and ``label``
int64; the schema metadata carries ``shape`` (C, H, W) and ``num_classes``.
Text schema: ``tokens`` fixed_size_list<int32>[seq_len + 1] (a window of character ids: inputs
and next-token targets); the metadata carries ``vocab_size``.
Every block reads all shards itself; a bad shard or row fails with the shard's name and the row.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dblocks.units import Shard

from .storage import Storage


class ShardError(ValueError):
    pass


def _bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, num_shards + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(num_shards)]


def _put(storage: Storage, rel: str, table: pa.Table) -> None:
    """Write a shard unless it already exists (shards are content-addressed by their prefix)."""
    if not storage.exists(rel):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(rel, buf.getvalue())


def _name(prefix: str, i: int, num_shards: int) -> str:
    return f"{prefix}/train-{i:05d}-of-{num_shards:05d}.parquet"


def write_image_shards(
    storage: Storage, prefix: str, x: torch.Tensor, y: torch.Tensor, num_shards: int, num_classes: int
) -> list[Shard]:
    """Split (N, C, H, W) images and labels into ``num_shards`` contiguous parquet shards under
    ``prefix``; shards that already exist are left as they are."""
    n, shape = len(y), tuple(x.shape[1:])
    flat = x.reshape(n, -1).numpy().astype(np.float32)
    meta = {b"shape": json.dumps(shape).encode(), b"num_classes": str(num_classes).encode()}
    shards = []
    for i, (lo, hi) in enumerate(_bounds(n, num_shards)):
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat[lo:hi].reshape(-1)), flat.shape[1])
        labels = pa.array(y[lo:hi].numpy(), pa.int64())
        table = pa.table({"pixels": pixels, "label": labels}).replace_schema_metadata(meta)
        _put(storage, _name(prefix, i, num_shards), table)
        shards.append(Shard(_name(prefix, i, num_shards), hi - lo))
    return shards


def write_text_shards(
    storage: Storage, prefix: str, windows: torch.Tensor, num_shards: int, vocab_size: int
) -> list[Shard]:
    """Split (N, seq_len + 1) token windows into ``num_shards`` contiguous parquet shards."""
    n, width = windows.shape
    ids = windows.numpy().astype(np.int32)
    meta = {b"vocab_size": str(vocab_size).encode()}
    shards = []
    for i, (lo, hi) in enumerate(_bounds(n, num_shards)):
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(ids[lo:hi].reshape(-1)), width)
        _put(storage, _name(prefix, i, num_shards), pa.table({"tokens": tokens}).replace_schema_metadata(meta))
        shards.append(Shard(_name(prefix, i, num_shards), hi - lo))
    return shards


def _read_table(storage: Storage, rel: str) -> tuple[str, pa.Table]:
    name = storage.uri(rel)
    try:
        return name, pq.read_table(io.BytesIO(storage.read_bytes(rel)))
    except pa.ArrowException as e:
        raise ShardError(f"{name}: not a readable parquet file ({e})") from None


def read_shard(storage: Storage, rel: str) -> tuple[torch.Tensor, ...]:
    """A shard's columns as the batch tuple a block trains on: (images, labels) or (tokens,)."""
    name, table = _read_table(storage, rel)
    if "tokens" in table.column_names:
        return (_text_rows(name, table),)
    return _image_rows(name, table)


def read_text_shard(storage: Storage, rel: str) -> torch.Tensor:
    """A text shard's windows (N, seq_len + 1) int64, validated row by row."""
    return _text_rows(*_read_table(storage, rel))


def _text_rows(name: str, table: pa.Table) -> torch.Tensor:
    meta = table.schema.metadata or {}
    if b"vocab_size" not in meta:
        raise ShardError(f"{name}: schema metadata needs 'vocab_size'")
    vocab = int(meta[b"vocab_size"])
    col = table.column("tokens").combine_chunks()
    if col.null_count:
        raise ShardError(f"{name} row {next(i for i in range(len(col)) if not col[i].is_valid)}: null value")
    if not pa.types.is_fixed_size_list(col.type) or not pa.types.is_integer(col.type.value_type):
        raise ShardError(f"{name}: column tokens must be fixed_size_list<int32>[seq_len + 1], got {col.type}")
    ids = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64).reshape(len(table), col.type.list_size)
    bad = ((ids < 0) | (ids >= vocab)).any(1)
    if bad.any():
        row = int(np.argmax(bad))
        token = int(ids[row][(ids[row] < 0) | (ids[row] >= vocab)][0])
        raise ShardError(f"{name} row {row}: token id {token} not in 0..{vocab - 1}")
    return torch.from_numpy(ids)


def read_image_shard(storage: Storage, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard's images (N, C, H, W) float32 and labels (N,) int64, validated row by row."""
    return _image_rows(*_read_table(storage, rel))


def _image_rows(name: str, table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    meta = table.schema.metadata or {}
    for col in ("pixels", "label"):
        if col not in table.column_names:
            raise ShardError(f"{name}: missing column {col!r} (has {table.column_names})")
    if b"shape" not in meta or b"num_classes" not in meta:
        raise ShardError(f"{name}: schema metadata needs 'shape' and 'num_classes'")
    shape, num_classes = tuple(json.loads(meta[b"shape"])), int(meta[b"num_classes"])
    pixels = table.column("pixels").combine_chunks()
    labels = table.column("label").to_numpy(zero_copy_only=False)
    size = int(np.prod(shape))
    if pixels.null_count or table.column("label").null_count:
        row = next(i for i in range(len(table)) if not pixels[i].is_valid or not table.column("label")[i].is_valid)
        raise ShardError(f"{name} row {row}: null value")
    if not pa.types.is_fixed_size_list(pixels.type) or pixels.type.list_size != size:
        raise ShardError(
            f"{name}: column pixels must be fixed_size_list<float32>[{size}] for shape {shape}, got {pixels.type}"
        )
    x = np.asarray(pixels.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(table), *shape)
    bad = ~np.isfinite(x.reshape(len(table), -1)).all(1) | (np.abs(x.reshape(len(table), -1)) > 1.0 + 1e-6).any(1)
    if bad.any():
        raise ShardError(f"{name} row {int(np.argmax(bad))}: pixels must be finite and in [-1, 1]")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise ShardError(f"{name} row {row}: label {labels[row]} not in 0..{num_classes - 1}")
    return torch.from_numpy(x.copy()), torch.from_numpy(labels.astype(np.int64))
