"""Held-out data for evaluation, the built-in digits, and deterministic batching.

Digits: scikit-learn's ``load_digits()`` (1,797 8x8 grey images, 16 levels, 10 classes), shipped
inside the package, never downloaded. Pixels v in {0..16} are scaled to ``v/8 - 1`` in [-1, 1],
the range EDM's sigma_data = 0.5 assumes (measured: mean -0.39, std 0.75 on the train split).
The train/test split is a fixed permutation (seed ``split_seed``, default 0), independent of the
run seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .datacard import DataCard, ShardInfo, SplitInfo, SplitSource, text_windows
from .seeds import derive_seed

EVAL_TRAIN_ROWS = 10_000  # train images an evaluation reads at most (train accuracy, the DiT's judge)


@dataclass(frozen=True)
class ImageSplit:
    train_x: torch.Tensor  # (N, 1, 8, 8) float32 in [-1, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor


def scale_pixels(v: torch.Tensor) -> torch.Tensor:
    """Digits grey levels {0..16} -> [-1, 1]."""
    return v / 8.0 - 1.0


def unscale_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for display."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def image_split(data: SplitSource, train_rows: int | None = EVAL_TRAIN_ROWS) -> ImageSplit:
    """A prepared image dataset's test split and the first ``train_rows`` train images."""
    train_x, train_y = data.split("train", limit=train_rows)
    test_x, test_y = data.split("test")
    return ImageSplit(train_x, train_y, test_x, test_y)


def load_digits_split(test_size: int = 360, split_seed: int = 0) -> ImageSplit:
    from sklearn.datasets import load_digits  # ships the data; imported lazily

    digits = load_digits()
    x = scale_pixels(torch.tensor(digits.images, dtype=torch.float32)).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    test, train = perm[:test_size], perm[test_size:]
    return ImageSplit(x[train], y[train], x[test], y[test])


class TensorData:
    """A dataset held as tensors: the in-process twin of a prepared dataset (worker/dataset.py), for
    pure-library code such as the benchmarks and fast tests. ``splits``: name -> (images, labels), or
    for text the split's chunks (1-D id tensors), cut into windows as a prepared dataset's are."""

    def __init__(self, card: DataCard, splits: dict[str, tuple[torch.Tensor, ...] | list[torch.Tensor]]):
        self.card, self.splits = card, splits

    def split(self, name: str, *, limit: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        if self.card.kind == "text":
            return (text_windows(self.splits[name], seq_len)[:limit],)
        return tuple(t[:limit] for t in self.splits[name])


def memory_card(kind: str, name: str, rows: dict[str, int], **fields) -> DataCard:
    """The card of a TensorData (one in-memory "shard" per split)."""
    splits = {k: SplitInfo(n, (ShardInfo(f"{k}/memory", n, 0, ""),)) for k, n in rows.items()}
    return DataCard(kind=kind, name=name, splits=splits, content_hash=f"{name}-in-memory", **fields)


def digits_data(test_size: int = 360, split_seed: int = 0) -> TensorData:
    """The built-in digits as a TensorData (the same tensors ``dblocks-data input=builtin:digits`` stores)."""
    d = load_digits_split(test_size, split_seed)
    splits = {"train": (d.train_x, d.train_y), "test": (d.test_x, d.test_y)}
    rows = {k: len(v[1]) for k, v in splits.items()}
    classes = tuple(str(k) for k in range(10))
    card = memory_card("images", f"digits-{test_size}-{split_seed}", rows, shape=(1, 8, 8), classes=classes)
    return TensorData(card, splits)


class BatchStream:
    """Batch indices as a pure function of (seed, step): a fresh permutation each epoch,
    the last partial batch dropped. Resuming at step k needs only k, no iterator state.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size > num_examples:
            raise ValueError(f"train.batch_size={batch_size}: larger than the {num_examples} training examples")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]
