"""Built-in data and deterministic batching.

Digits: scikit-learn's ``load_digits()`` (1,797 8x8 grey images, 16 levels, 10 classes), shipped
inside the package, never downloaded. Pixels v in {0..16} are scaled to ``v/8 - 1`` in [-1, 1],
the range EDM's sigma_data = 0.5 assumes (measured: mean -0.39, std 0.75 on the train split).
The train/test split is a fixed permutation (seed ``split_seed``, default 0), independent of the
run seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .seeds import derive_seed


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


def load_digits_split(test_size: int = 360, split_seed: int = 0) -> ImageSplit:
    from sklearn.datasets import load_digits  # ships the data; imported lazily

    digits = load_digits()
    x = scale_pixels(torch.tensor(digits.images, dtype=torch.float32)).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    test, train = perm[:test_size], perm[test_size:]
    return ImageSplit(x[train], y[train], x[test], y[test])


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
