"""Streaming reads: a work unit's rows are read when it is due, the next unit's while it trains.

A worker holds at most two units' rows at a time (the one training and the one being read on a
background thread), so its memory does not grow with the dataset: every block still sees the whole
dataset, one shard's row range at a time. Rows come back pinned when the device is CUDA, so the
per-batch copies to the GPU can overlap. The rows themselves are what ``Dataset.read_rows`` returns:
the reader validates them, and a bad row fails the unit with the shard's name and the row.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dblocks.units import WorkUnit

from .dataset import Dataset

Rows = tuple[torch.Tensor, ...]


def _key(unit: WorkUnit) -> tuple[str, int, int]:
    return unit.shard, unit.row_start, unit.row_end


class RowPrefetcher:
    """``rows(unit)``: the unit's rows (read now, or already read by ``prefetch(unit)``)."""

    def __init__(self, data: Dataset, *, seq_len: int | None, pin: bool = False):
        self.data, self.seq_len, self.pin = data, seq_len, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dblocks-prefetch")
        self._pending: dict[tuple, Future] = {}
        self._last: tuple[tuple, Rows] | None = None  # consecutive units over the same rows read them once

    def _read(self, key: tuple[str, int, int]) -> Rows:
        rows = self.data.read_rows(*key, seq_len=self.seq_len)
        return tuple(r.pin_memory() for r in rows) if self.pin else rows

    def prefetch(self, unit: WorkUnit) -> None:
        """Start reading ``unit``'s rows on the background thread (no-op if they are read or on their way)."""
        key = _key(unit)
        if key not in self._pending and (self._last is None or self._last[0] != key):
            self._pending = {key: self._pool.submit(self._read, key)}  # at most one unit ahead

    def rows(self, unit: WorkUnit) -> Rows:
        key = _key(unit)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self.prefetch(unit)
        rows = self._pending.pop(key).result()  # a read error surfaces here, in the unit that needs the rows
        self._last = key, rows
        return rows

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RowPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
