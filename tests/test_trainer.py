"""Single-block trainer (paper Eq. 6 on one block), gradient isolation, bit-exact resume, checkpoints."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from dblocks import (
    BatchStream,
    BlockTrainer,
    DiTBlock,
    TrainConfig,
    block_seed,
    dit_loss,
    load_checkpoint,
    make_plan,
    save_checkpoint,
    seeded,
)
from dblocks.levels import SigmaLevels
from helpers import binomial_tol, interval_mass

SEED = 42
LEVELS = SigmaLevels()
NUM_EXAMPLES = 64


def _train_cfg(**kw) -> TrainConfig:
    base = dict(steps=10, batch_size=8, lr=1e-3, warmup_samples=32, ema_halflife_samples=64)
    base.update(kw)
    return TrainConfig(**base)


def _dataset():
    g = torch.Generator().manual_seed(2024)
    images = torch.rand(NUM_EXAMPLES, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (NUM_EXAMPLES,), generator=g)
    return images, labels


def _build(cfg, spec, train_cfg=None, loss_fn=dit_loss, seed=SEED) -> BlockTrainer:
    with seeded(block_seed(seed, spec.index, "init")):
        net = DiTBlock(cfg, spec.num_layers)
    return BlockTrainer(net, spec, loss_fn, train_cfg or _train_cfg(), LEVELS, seed)


def _batch(data, stream: BatchStream, step: int):
    idx = stream.indices(step)
    return data[0][idx], data[1][idx]


def _run(trainer: BlockTrainer, data, stream: BatchStream, start: int, stop: int) -> list[float]:
    return [trainer.step(_batch(data, stream, k))["loss"] for k in range(start, stop)]


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_state_equal(a: BlockTrainer, b: BlockTrainer) -> None:
    ta, ma = a.state_dict()
    tb, mb = b.state_dict()
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert ma["step"] == mb["step"] and ma["samples"] == mb["samples"]
    assert any(k.startswith("opt.") and k.endswith("exp_avg_sq") for k in ta)  # optimizer state is covered


# ---- 9. gradient isolation ----------------------------------------------------------------------
@pytest.mark.parametrize("trained", [0, 1, 2])
def test_one_block_step_leaves_every_other_block_untouched(debug_cfg, trained):
    plan = make_plan(LEVELS, 3, debug_cfg.layers)
    trainers = [_build(debug_cfg, spec) for spec in plan]
    nets = [t.net for t in trainers]
    # No parameter object or storage is shared between blocks (design.md 2.1).
    for i in range(3):
        for j in range(i + 1, 3):
            assert not {id(p) for p in nets[i].parameters()} & {id(p) for p in nets[j].parameters()}
            assert not {p.data_ptr() for p in nets[i].parameters()} & {p.data_ptr() for p in nets[j].parameters()}
    before = [(_snapshot(t.net), _snapshot(t.ema)) for t in trainers]
    data, stream = _dataset(), BatchStream(NUM_EXAMPLES, 8, SEED)
    trainers[trained].step(_batch(data, stream, 0))
    for b, t in enumerate(trainers):
        if b == trained:
            changed = [n for n, p in t.net.named_parameters() if not torch.equal(p, before[b][0][n])]
            # adaLN-Zero: at init only the zero head receives a gradient (every path runs through it).
            assert {"head.weight", "head.bias"} <= set(changed)
            continue
        for n, p in t.net.named_parameters():
            assert torch.equal(p, before[b][0][n]), (b, n)
            assert p.grad is None, (b, n)
        for n, p in t.ema.named_parameters():
            assert torch.equal(p, before[b][1][n]), (b, n)
        assert t.step_count == 0 and not t.opt.state


def test_trainer_holds_only_its_block_parameters(debug_cfg):
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[1]
    t = _build(debug_cfg, spec)
    assert len(t.net.layers) == debug_cfg.layers // 3
    opt_params = [p for g in t.opt.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in t.net.parameters()}
    assert not {p.data_ptr() for p in t.ema.parameters()} & {p.data_ptr() for p in t.net.parameters()}
    assert all(not p.requires_grad for p in t.ema.parameters())


# ---- training mechanics -------------------------------------------------------------------------
def test_training_sigmas_come_from_the_widened_range(debug_cfg):
    """Overlap applies to training: sigmas fill the gamma-widened range, with the closed-form share
    of draws outside the routing range."""
    spec = make_plan(LEVELS, 3, debug_cfg.layers, gamma=0.1)[1]
    drawn = []

    def recording_loss(net, batch, sigma, generator):
        drawn.append(sigma.clone())
        return dit_loss(net, batch, sigma, generator)

    t = _build(debug_cfg, spec, _train_cfg(batch_size=512), loss_fn=recording_loss)
    n_img = 512
    batch = (torch.zeros(n_img, 1, 8, 8), torch.zeros(n_img, dtype=torch.long))
    for _ in range(4):
        t.step(batch)
    sig = torch.cat(drawn).double()
    assert sig.numel() == 4 * n_img
    assert sig.min() >= torch.tensor(spec.train_lo, dtype=torch.float32).double()
    assert sig.max() <= torch.tensor(spec.train_hi, dtype=torch.float32).double()
    p_out = 1 - interval_mass(spec.lo, spec.hi) / interval_mass(spec.train_lo, spec.train_hi)
    frac_out = ((sig < spec.lo) | (sig > spec.hi)).double().mean().item()
    assert abs(frac_out - p_out) < binomial_tol(p_out, sig.numel())
    assert t.step_count == 4 and t.samples == 4 * n_img


@pytest.mark.parametrize("grad_clip", [1e-3, 1e9])
def test_gradients_are_clipped_to_the_configured_norm(debug_cfg, image_batch, grad_clip):
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[2]
    t = _build(debug_cfg, spec, _train_cfg(grad_clip=grad_clip))
    for _ in range(2):
        out = t.step(image_batch)
    post = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.net.parameters() if p.grad is not None]))
    assert out["grad_norm"] > 1e-2  # the reported norm is the pre-clip one
    assert post.item() == pytest.approx(min(out["grad_norm"], grad_clip), rel=1e-4)


def test_learning_rate_warms_up_linearly_then_stays_constant(debug_cfg):
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[0]
    t = _build(debug_cfg, spec, _train_cfg(lr=2e-3, warmup_samples=1000))
    assert 0 < t.lr_at(0) <= 2e-3 / 1000 * 2
    for s1, s2 in [(0, 100), (100, 500), (250, 998)]:
        assert t.lr_at(s2) - t.lr_at(s1) == pytest.approx(2e-3 * (s2 - s1) / 1000, rel=1e-9)
    assert t.lr_at(1000) == 2e-3 and t.lr_at(10**6) == 2e-3
    t0 = _build(debug_cfg, spec, _train_cfg(lr=2e-3, warmup_samples=0))
    assert t0.lr_at(0) == 2e-3


def test_ema_half_life_in_samples(debug_cfg, image_batch):
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[0]
    t = _build(debug_cfg, spec, _train_cfg(ema_halflife_samples=20_000, ema_rampup=0.1))
    t.samples = 10**7  # ramp-up inactive: half-life = 20,000 samples
    for n in (8, 128, 1000):
        assert t.ema_beta(n) == pytest.approx(0.5 ** (n / 20_000), rel=1e-12)
        assert t.ema_beta(n) ** (20_000 / n) == pytest.approx(0.5, rel=1e-9)  # halves after 20k samples
    t.samples = 50_000  # ramp-up active: half-life = 0.1 * samples seen
    assert t.ema_beta(128) == pytest.approx(0.5 ** (128 / 5_000), rel=1e-12)
    # One step moves the EMA by lerp(ema, net, 1 - beta).
    t2 = _build(debug_cfg, spec, _train_cfg(ema_halflife_samples=64))
    t2.step(image_batch)
    old = _snapshot(t2.ema)
    t2.step(image_batch)
    beta = t2.ema_beta(image_batch[0].shape[0])
    assert 0 < beta < 1
    for n, p in t2.net.named_parameters():
        exp = old[n] + (1 - beta) * (p.detach() - old[n])
        torch.testing.assert_close(dict(t2.ema.named_parameters())[n], exp, rtol=1e-6, atol=1e-7)


def test_block_seed_is_stable_and_distinct():
    seeds = {block_seed(0, b, p) for b in range(8) for p in ("train", "init")}
    assert len(seeds) == 16
    assert block_seed(0, 1) == block_seed(0, 1, "train")
    assert block_seed(1, 1) != block_seed(0, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_seeded_restores_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(5):
        inside = torch.rand(3)
    after = torch.rand(3)
    assert torch.equal(after, expected)  # the outer stream continues as if nothing happened
    torch.manual_seed(5)
    assert torch.equal(inside, torch.rand(3))


# ---- 10. bit-exact resume -----------------------------------------------------------------------
@pytest.mark.parametrize("block", [0, 2])
def test_resume_from_checkpoint_is_bit_exact(debug_cfg, tmp_path, block):
    k, m = 3, 3
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[block]
    data, stream = _dataset(), BatchStream(NUM_EXAMPLES, 8, SEED)

    straight = _build(debug_cfg, spec)
    losses_straight = _run(straight, data, stream, 0, k + m)

    first = _build(debug_cfg, spec)
    _run(first, data, stream, 0, k)
    path = save_checkpoint(tmp_path / f"block{block}.safetensors", *first.state_dict())
    del first

    tensors, meta = load_checkpoint(path)
    resumed = _build(debug_cfg, spec, seed=SEED)
    resumed.load_state_dict(tensors, meta)
    assert resumed.step_count == k and resumed.samples == k * 8
    fresh_stream = BatchStream(NUM_EXAMPLES, 8, SEED)  # a restarted process rebuilds its stream
    losses_resumed = _run(resumed, data, fresh_stream, k, k + m)

    assert losses_resumed == losses_straight[k:]
    _assert_state_equal(resumed, straight)
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())
    for ga, gb in zip(resumed.opt.param_groups, straight.opt.param_groups):
        assert ga["lr"] == gb["lr"] and tuple(ga["betas"]) == tuple(gb["betas"])


def test_resume_restores_a_differently_initialised_trainer(debug_cfg, tmp_path, image_batch):
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[1]
    a = _build(debug_cfg, spec)
    for _ in range(2):
        a.step(image_batch)
    save_checkpoint(tmp_path / "a.safetensors", *a.state_dict())
    b = _build(debug_cfg, spec, seed=SEED + 1)  # other init, other generator
    b.load_state_dict(*load_checkpoint(tmp_path / "a.safetensors"))
    _assert_state_equal(a, b)
    assert a.step(image_batch)["loss"] == b.step(image_batch)["loss"]
    _assert_state_equal(a, b)


def test_loading_another_blocks_checkpoint_fails(debug_cfg, image_batch):
    plan = make_plan(LEVELS, 3, debug_cfg.layers)
    a = _build(debug_cfg, plan[0])
    a.step(image_batch)
    with pytest.raises(ValueError, match="block"):
        _build(debug_cfg, plan[1]).load_state_dict(*a.state_dict())


# ---- checkpoints ----------------------------------------------------------------------------
def test_checkpoint_is_plain_safetensors(debug_cfg, tmp_path, image_batch):
    spec = make_plan(LEVELS, 3, debug_cfg.layers)[0]
    t = _build(debug_cfg, spec)
    t.step(image_batch)
    tensors, meta = t.state_dict()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.safetensors", tensors, meta)
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # neither pickle nor torch zip
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["dblocks"]) == json.loads(json.dumps(meta))
    # safetensors alone (no dblocks, no pickle) reads every tensor back bit-exactly.
    plain = load_file(str(path))
    assert sorted(plain) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(plain[k], v), k
    tensors2, meta2 = load_checkpoint(path)
    assert meta2 == json.loads(json.dumps(meta))
    assert all(torch.equal(tensors2[k], tensors[k]) for k in tensors)


def test_checkpoint_save_is_atomic(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"x": torch.arange(4.0)}, {"step": 1})
    save_checkpoint(path, {"x": torch.arange(5.0)}, {"step": 2})  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["x"], torch.arange(5.0)) and meta == {"step": 2}
    # A save that fails midway (unserialisable metadata) keeps the previous checkpoint, leaves no temp file.
    with pytest.raises(TypeError):
        save_checkpoint(path, {"x": torch.arange(6.0)}, {"step": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["x"], torch.arange(5.0)) and meta == {"step": 2}


def test_load_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


# ---- deterministic batching ---------------------------------------------------------------------
def test_batch_stream_epochs_are_permutations_and_a_pure_function_of_step():
    s = BatchStream(50, 8, seed=3)
    assert s.per_epoch == 6  # the last partial batch (2 examples) is dropped
    for epoch in range(3):
        idx = torch.cat([s.indices(epoch * 6 + k) for k in range(6)])
        assert idx.numel() == 48 and idx.unique().numel() == 48
        assert bool((idx >= 0).all() and (idx < 50).all())
    assert not torch.equal(s.indices(0), s.indices(6))  # a fresh permutation each epoch
    # Random access equals sequential access, and a new stream reproduces it.
    seq = [s.indices(k).clone() for k in range(20)]
    r = BatchStream(50, 8, seed=3)
    for k in (17, 3, 12, 0, 19, 6):
        assert torch.equal(r.indices(k), seq[k])
    assert not torch.equal(BatchStream(50, 8, seed=4).indices(0), seq[0])
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(5, 8, seed=0)
