"""The judge of sampled text (issue 15): trained once, deterministic, cached; its metrics' closed forms."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dblocks.build import make_trainer, model_plans
from dblocks.families import FAMILIES
from dblocks.families.discrete import pick_argmax, pick_temperature, pick_top_p
from dblocks.judge import (
    JudgeConfig,
    distinct_n,
    generative_perplexity,
    load_judge,
    sample_metrics,
    unigram_entropy,
)
from dblocks.models.ar import ARConfig
from dblocks.text import VOCAB_SIZE, load_text_split
from worker.config import load_run_config

SMALL = JudgeConfig(model=ARConfig(width=32, heads=2, layers=2, seq_len=32, freq_dim=32), steps=150, batch_size=32)


@pytest.fixture(scope="module")
def split():
    return load_text_split(32)


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    """The small judge trained twice, from scratch, into two cache directories."""
    dirs = [tmp_path_factory.mktemp(f"judge{i}") for i in range(2)]
    return dirs, [load_judge(split.train[:4000], d, SMALL) for d in dirs]


def _ppl(judge, windows: torch.Tensor) -> float:
    return generative_perplexity(judge.net, windows[:, :8], windows[:, 8:])


def test_the_judge_is_deterministic(trained, split):
    _, (a, b) = trained
    assert a.trained and b.trained and a.path.name == b.path.name and a.path != b.path
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _ppl(a, split.val[:64]) == _ppl(b, split.val[:64])


def test_the_judge_is_cached_and_a_second_call_does_not_train(trained, split):
    (first, _), (a, _) = trained
    mtime = a.path.stat().st_mtime_ns
    again = load_judge(split.train[:4000], first, SMALL)
    assert not again.trained and again.path == a.path and a.path.stat().st_mtime_ns == mtime
    sa, s2 = a.net.state_dict(), again.net.state_dict()
    assert all(torch.equal(sa[k], s2[k]) for k in sa)
    other = load_judge(split.train[:4000], first, replace(SMALL, steps=1))  # another config: another key
    assert other.trained and other.path.parent != a.path.parent


def test_held_out_text_scores_finite_and_below_uniform_random_characters(trained, split):
    _, (judge, _) = trained
    held = split.val[:128]
    noise = torch.randint(0, VOCAB_SIZE, held.shape, generator=torch.Generator().manual_seed(0))
    noise[:, :8] = held[:, :8]  # the same prompts, random continuations
    text, rand = _ppl(judge, held), _ppl(judge, noise)
    assert math.isfinite(text) and text < rand
    assert text < VOCAB_SIZE  # better than the uniform guess


def test_entropy_and_distinct_n_closed_forms():
    assert unigram_entropy(torch.tensor([[0, 1, 2, 3]]), 8) == pytest.approx(2.0)  # uniform over 4: 2 bits
    assert unigram_entropy(torch.tensor([[5, 5, 5]]), 8) == 0.0
    assert distinct_n(torch.tensor([[1, 1, 1, 1, 1]]), 2) == 0.25  # one bigram, 4 times
    assert distinct_n(torch.tensor([[1, 2, 3], [1, 2, 3]]), 2) == 0.5  # (1,2), (2,3) twice each


def test_pickers():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert pick_argmax(logits, g).tolist() == [1, 0]
    assert pick_top_p(logits, g, top_p=1e-6).tolist() == [1, 0]  # the nucleus of one token: argmax
    draws = torch.stack([pick_temperature(logits, g) for _ in range(2000)])
    freq = (draws[:, 0] == 1).double().mean().item()
    p = torch.softmax(logits[0].double(), 0)[1].item()
    assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / 2000)


@pytest.mark.parametrize(("name", "model"), [("ar", "blocks"), ("ar", "e2e"), ("recurrent", "blocks")])
def test_sample_metrics_of_a_familys_decoders(trained, split, name, model):
    """Every decoding is scored; the chain's deterministic variant (argmax, from z = 0) and the
    end-to-end argmax do not depend on the seed."""
    _, (judge, _) = trained
    run = load_run_config(
        {
            "model": {"family": name, "size": "debug", "seq_len": 32},
            "data": {"source": "text"},
            "blocks": {"num": 1 if FAMILIES[name].one_block else 2},
        }
    )
    plan = model_plans(run)[model]
    baseline = model == "e2e"
    nets = [make_trainer(run, spec, baseline=baseline).ema for spec in plan]
    decoders = run.family.decoders(nets, plan, run, baseline=baseline)
    assert set(decoders) == ({"argmax", "sampled", "top_p"} if baseline else {"argmax", "sampled"})
    held, val = split.val[:8, :24], split.val[8:16]
    a, b = (sample_metrics(judge, decoders, held, val, seq_len=32, prompt_chars=8, seed=s) for s in (0, 1))
    for d in decoders:
        for key in ("judge_ppl", "entropy", "distinct4", "accuracy"):
            assert math.isfinite(a[f"{key}_{d}"]), f"{key}_{d}"
    assert a["judge_ppl_text"] == b["judge_ppl_text"]
    assert a["judge_ppl_argmax"] == b["judge_ppl_argmax"] and a["accuracy_argmax"] == b["accuracy_argmax"]
