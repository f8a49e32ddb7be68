"""The built-in text corpus and its fixed split (dblocks/text.py); its prepared form is tested in test_data.py."""

from __future__ import annotations

import pytest
import torch

from dblocks.config import ConfigError
from dblocks.text import (
    CHUNK,
    VOCAB,
    VOCAB_SIZE,
    TextError,
    decode,
    encode,
    load_corpus,
    load_text_split,
    split_chunks,
    windows,
)
from worker.config import load_run_config


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_corpus()


@pytest.fixture(scope="module")
def split():
    return load_text_split(64, 0)


def test_corpus_is_the_shipped_shakespeare_and_vocab_is_exactly_its_characters(corpus):
    assert len(corpus) == 5_057_198
    assert "".join(sorted(set(corpus))) == VOCAB and VOCAB_SIZE == 84
    assert "To be, or not to be" in corpus


def test_encode_decode_round_trip_and_unknown_character_is_named():
    s = "ROMEO:\nBut, soft! what light [through] yonder {window} breaks?"
    ids = encode(s)
    assert ids.dtype == torch.int64 and decode(ids) == s
    assert ids.tolist()[:2] == [VOCAB.index("R"), VOCAB.index("O")]
    with pytest.raises(TextError, match="'é' is not in the 84-character"):
        encode("café")


def test_windows_are_non_overlapping_and_shifted_by_one():
    ids = torch.arange(23)
    w = windows(ids, 5)  # (23 - 1) // 5 = 4 windows of 6 tokens
    assert w.shape == (4, 6)
    assert w[:, 0].tolist() == [0, 5, 10, 15] and w[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_split_is_fixed_disjoint_and_covers_the_corpus(corpus, split):
    chunks = -(-len(corpus) // CHUNK)  # 1235 chunks; 2% each held out
    held = round(0.02 * chunks)
    per_chunk = (CHUNK - 1) // 64
    assert split.val.shape == split.test.shape == (held * per_chunk, 65)
    assert split.train.shape[1] == 65 and len(split.train) > 70_000
    again = load_text_split(64, 0)
    assert torch.equal(again.train, split.train) and torch.equal(again.test, split.test)
    other = load_text_split(64, 1)
    assert not torch.equal(other.test, split.test)
    parts = split_chunks(chunks, 0)  # chunks, not windows, are assigned: no window straddles two splits
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(chunks))
    assert len(parts["val"]) == len(parts["test"]) == held
    ids = encode(corpus)
    first = parts["test"][0]
    assert torch.equal(split.test[0], ids[first * CHUNK : first * CHUNK + 65])


def test_a_family_needs_its_data_source():
    with pytest.raises(ConfigError, match="model.family=ar trains on data=text, not data=digits: add data=text"):
        load_run_config({"model": {"family": "ar"}})
    with pytest.raises(ConfigError, match="model.family=dit trains on data=digits"):
        load_run_config({"data": {"source": "text"}})
