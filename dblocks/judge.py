"""A fixed judge of sampled text, and the sample-based metrics of the text families (issue 15).

The paper evaluates its AR and recurrent models by their samples, not by teacher-forced accuracy:
generative perplexity of continuations under a fixed judge model, with the end-to-end model
sampled too. Generative perplexity alone rewards low-entropy text (repeating "the the the" scores
well), so it is reported beside the samples' unigram entropy and distinct-n.

- The judge is a character LM: the AR family's end-to-end network (``ARBaseline``), larger than
  the benchmark's models, trained with its own seed on next-token CE over the train split by the
  same :class:`~dblocks.trainer.BlockTrainer` every block uses. It is trained once and cached in a
  directory keyed by a hash of (training windows, :class:`JudgeConfig`); every later call loads it.
- :func:`sample_metrics` continues held-out prompts with every decoding a model offers
  (``Family.decoders``: the end-to-end model's argmax, temperature-1 and top-p 0.95 samples; the
  chain's sampled and deterministic variants) and scores the held-out continuations themselves, the
  ceiling. Next-character accuracy is reported per decoding, so it is compared like for like:
  argmax with argmax, sampled with sampled.

    judge = load_judge(train_windows, Path("outputs/judge"))
    metrics = sample_metrics(judge, family.decoders(nets, plan, run, baseline=False), held_out, val)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import BatchStream
from .families.ar import ar_baseline_loss, next_token_ce
from .families.base import WeightedLoss
from .families.discrete import Decoder
from .levels import SigmaLevels
from .models.ar import ARBaseline, ARConfig
from .plan import make_plan
from .seeds import derive_seed, seeded
from .text import next_token_pairs
from .trainer import BlockTrainer

JUDGE_FILE = "judge.safetensors"


@dataclass(frozen=True)
class JudgeConfig:
    """The judge's network (an end-to-end AR LM) and its training: wider than the benchmark's
    ``tiny`` models (w64, 8 layers), on 64-character windows, with a seed of its own, and ~3x the
    training windows they see (2000 x 32 vs 600 x 32 for the AR family); ~0.3 s a step on one CPU thread."""

    model: ARConfig = field(default_factory=lambda: ARConfig(width=128, heads=4, layers=4, seq_len=64))
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_samples: int = 5000
    ema_halflife_samples: int = 20000
    seed: int = 7919

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Judge:
    net: ARBaseline  # the EMA weights, in eval mode
    cfg: JudgeConfig
    path: Path  # the cached weights
    trained: bool  # True when this call trained it; False when it was loaded from the cache


def judge_key(windows: torch.Tensor, cfg: JudgeConfig) -> str:
    """sha256 of the training windows' ids and the judge's config: the cache directory's name."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_judge(windows: torch.Tensor, cfg: JudgeConfig) -> ARBaseline:
    """``cfg.steps`` steps of next-token CE on ``windows`` (N, seq_len + 1) from ``cfg.seed``; the EMA net."""
    spec = make_plan(SigmaLevels(), 1, cfg.model.layers)[0]
    with seeded(derive_seed(cfg.seed, "judge", "init")):
        net = ARBaseline(cfg.model, cfg.model.layers)
    train = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_samples=cfg.warmup_samples,
        ema_halflife_samples=cfg.ema_halflife_samples,
        device="cpu",
    )
    trainer = BlockTrainer(net, spec, WeightedLoss(ar_baseline_loss), train, SigmaLevels(), cfg.seed)
    stream = BatchStream(len(windows), cfg.batch_size, derive_seed(cfg.seed, "judge", "batches"))
    for step in range(cfg.steps):
        trainer.step((windows[stream.indices(step)],))
    return trainer.ema.eval().requires_grad_(False)


def load_judge(windows: torch.Tensor, cache_dir: Path, cfg: JudgeConfig = JudgeConfig()) -> Judge:
    """The judge of the train ``windows`` (N, >= seq_len + 1): loaded from ``cache_dir/<key>/`` when a
    previous call trained it, else trained once and saved there."""
    windows = windows[:, : cfg.model.seq_len + 1]
    path = Path(cache_dir) / judge_key(windows, cfg) / JUDGE_FILE
    net = ARBaseline(cfg.model, cfg.model.layers)
    if path.is_file():
        tensors, _ = load_checkpoint(path)
        net.load_state_dict(tensors)
        return Judge(net.eval().requires_grad_(False), cfg, path, trained=False)
    net = train_judge(windows, cfg)
    save_checkpoint(path, net.state_dict(), {"judge": cfg.to_dict(), "windows": list(windows.shape)})
    return Judge(net, cfg, path, trained=True)


# ---- the metrics ----------------------------------------------------------------------------------
@torch.no_grad()
def continuation_nll(judge: nn.Module, prompts: torch.Tensor, continuations: torch.Tensor) -> torch.Tensor:
    """The judge's mean NLL (nats/char) of each continuation (N, C) after its prompt (N, P), (N,).
    Prompt and continuation must fit the judge's context: P + C <= seq_len + 1."""
    seq = torch.cat([prompts, continuations], dim=1)
    if seq.shape[1] > judge.cfg.seq_len + 1:
        raise ValueError(f"prompt + continuation of {seq.shape[1]} characters exceed the judge's context")
    x, y = next_token_pairs(seq)
    p = prompts.shape[1]
    return next_token_ce(judge(x)[:, p - 1 :], y[:, p - 1 :])


def generative_perplexity(judge: nn.Module, prompts: torch.Tensor, continuations: torch.Tensor) -> float:
    """exp of the judge's mean NLL per character of the continuations (the paper's Gen PPL)."""
    return math.exp(continuation_nll(judge, prompts, continuations).mean().item())


def unigram_entropy(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy (bits) of the characters' empirical distribution over all of ``ids``."""
    p = torch.bincount(ids.flatten(), minlength=vocab_size).double() / ids.numel()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def distinct_n(ids: torch.Tensor, n: int = 4) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over the rows of ``ids`` (N, C)."""
    grams = [tuple(row[i : i + n]) for row in ids.tolist() for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams)


@torch.no_grad()
def continue_text(
    decoder: Decoder, prompts: torch.Tensor, length: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``length`` characters after each prompt (N, P), one at a time, the context cropped to the last
    ``seq_len``: the decoder's pick of its logits at the last position. Returns (N, length)."""
    ids = prompts
    for _ in range(length):
        ctx = ids[:, -seq_len:]
        nxt = decoder.pick(decoder.logits(ctx, generator)[:, -1], generator)
        ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
    return ids[:, prompts.shape[1] :]


@torch.no_grad()
def next_char_accuracy(decoder: Decoder, windows: torch.Tensor, generator: torch.Generator) -> float:
    """Teacher-forced accuracy of the decoder's pick at every position of ``windows`` (N, T + 1)."""
    x, y = next_token_pairs(windows)
    return (decoder.pick(decoder.logits(x, generator), generator) == y).double().mean().item()


def text_metrics(judge: nn.Module, prompts: torch.Tensor, continuations: torch.Tensor, vocab_size: int) -> dict:
    """Gen PPL under the judge, unigram entropy (bits) and distinct-4 of continuations (N, C)."""
    return {
        "judge_ppl": generative_perplexity(judge, prompts, continuations),
        "entropy": unigram_entropy(continuations, vocab_size),
        "distinct4": distinct_n(continuations, 4),
    }


def sample_metrics(
    judge: Judge,
    decoders: Mapping[str, Decoder],
    held_out: torch.Tensor,
    val: torch.Tensor,
    *,
    seq_len: int,
    prompt_chars: int = 16,
    seed: int = 0,
) -> dict:
    """Per decoding d: ``judge_ppl_d``, ``entropy_d``, ``distinct4_d`` of continuations of the
    held-out prompts ``held_out[:, :prompt_chars]`` (the rest of each row is the reference, scored as
    ``*_text``: the ceiling), and ``accuracy_d`` teacher-forced on ``val`` (N, seq_len + 1).
    ``seq_len`` is the model's context; every draw comes from one generator seeded ``seed``."""
    device = judge.net.head.weight.device
    prompts, reference = held_out[:, :prompt_chars].to(device), held_out[:, prompt_chars:].to(device)
    vocab = judge.cfg.model.vocab_size
    out = {f"{k}_text": v for k, v in text_metrics(judge.net, prompts, reference, vocab).items()}
    g = torch.Generator().manual_seed(seed)
    for name, decoder in decoders.items():
        cont = continue_text(decoder, prompts, reference.shape[1], seq_len, g)
        out.update({f"{k}_{name}": v for k, v in text_metrics(judge.net, prompts, cont, vocab).items()})
        out[f"accuracy_{name}"] = next_char_accuracy(decoder, val, g)
    return out
