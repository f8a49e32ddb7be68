"""The GPU path on CPU (issue 12): bf16 trains to the fp32 loss, fp32 stays where the paper needs it,
activation checkpointing leaves every gradient bit-identical, the fp16 loss scale skips an overflowed
step and resumes bit-exactly, compile trains the same block, and bad settings are one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dblocks import ConfigError, load_digits_split, load_text_split
from dblocks.build import make_trainer, model_plans
from dblocks.families import FAMILIES
from dblocks.metrics import heldout_loss
from dblocks.precision import MODES, Mode, checkpoint_layers, mode_for
from dblocks.precond import denoise
from dblocks.units import WorkUnit, apply_unit
from helpers import TINY_DEBUG_JOB, family_run

N = 8


def _run(name: str = "dit", **train):
    return family_run(name, threads=1, **train)


def _batch(run, n: int = N) -> tuple:
    if run.family.data == "digits":
        split = load_digits_split()
        return split.train_x[:n], split.train_y[:n]
    return (load_text_split(run.model.resolved().seq_len).train[:n],)


def _grads(trainer, batch) -> dict[str, torch.Tensor]:
    """Parameter gradients of one loss evaluation (no optimizer step)."""
    spec = trainer.spec
    level = trainer.levels.sample(N, spec.train_lo, spec.train_hi, torch.Generator().manual_seed(3))
    trainer.net.zero_grad(set_to_none=True)
    trainer.loss_fn(trainer.net, batch, level, torch.Generator().manual_seed(7)).mean().backward()
    return {n: p.grad.clone() for n, p in trainer.net.named_parameters() if p.grad is not None}


# ---- activation checkpointing ----------------------------------------------------------------------
@pytest.mark.parametrize("baseline", [False, True], ids=["block", "baseline"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_activation_checkpointing_leaves_every_gradient_bit_identical(name, baseline):
    run, ckpt = _run(name), _run(name, activation_checkpointing=True)
    spec = model_plans(run)["e2e" if baseline else "blocks"][0]
    plain, checkpointed = make_trainer(run, spec, baseline=baseline), make_trainer(ckpt, spec, baseline=baseline)
    stacks = [
        m.layers for m in checkpointed.net.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
    ]
    assert stacks and all("forward" in vars(layer) for stack in stacks for layer in stack)  # every layer wrapped
    batch = _batch(run)
    a, b = _grads(plain, batch), _grads(checkpointed, batch)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The EMA copy (evaluated and exported) is a plain module, and the weights are the same.
    assert not any("forward" in vars(m) for m in checkpointed.ema.modules())
    assert checkpointed.net.state_dict().keys() == plain.net.state_dict().keys()


def test_checkpointing_stores_fewer_activations():
    """The point of checkpointing: autograd saves fewer bytes for backward (recomputed instead)."""
    run = _run("dit")
    spec = model_plans(run)["blocks"][0]

    def saved(trainer) -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        level = torch.full((N,), 1.0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.loss_fn(trainer.net, _batch(run), level, torch.Generator().manual_seed(0)).mean()
        return sum(total)

    plain = make_trainer(run, spec)
    wrapped = make_trainer(run, spec)
    assert checkpoint_layers(wrapped.net) == spec.num_layers
    assert saved(wrapped) < 0.5 * saved(plain)


# ---- precision -------------------------------------------------------------------------------------
def _train_and_evaluate(run, steps: int) -> float:
    """Train block 0 of the debug preset for ``steps`` steps on digits; its held-out Eq. 6 loss
    over its own sigma range (EMA weights)."""
    split = load_digits_split()
    spec = model_plans(run)["blocks"][0]
    trainer = make_trainer(run, spec)
    unit = WorkUnit(0, "memory", 0, len(split.train_y), 0, steps, 11)
    apply_unit(trainer, unit, (split.train_x, split.train_y))
    return heldout_loss(
        run.family.denoiser(trainer.ema, run.levels), split.test_x, split.test_y, spec.lo, spec.hi, run.levels
    )


BF16_TOLERANCE = 0.03  # relative: bf16's 8-bit mantissa in the matmuls, fp32 everywhere else


def test_bf16_reaches_the_fp32_loss_within_tolerance():
    """The debug preset's block 0 (its own batch size, lr and warm-up), 150 steps each way."""
    kw = dict(batch_size=64, warmup_samples=2000, ema_halflife_samples=2000)
    fp32 = _train_and_evaluate(_run("dit", **kw), 150)
    bf16 = _train_and_evaluate(_run("dit", precision="bf16", **kw), 150)
    assert abs(bf16 - fp32) / fp32 < BF16_TOLERANCE, (fp32, bf16)


def test_under_bf16_the_preconditioning_and_the_loss_stay_fp32():
    run = _run("dit", precision="bf16")
    spec = model_plans(run)["blocks"][0]
    trainer = make_trainer(run, spec)
    images, labels = _batch(run)
    sigma = torch.full((N,), 0.3)
    seen = {}

    def raw(*args, **kw):  # the network itself runs in bf16 under autocast
        out = trainer.net(*args, **kw)
        seen["f"] = out.dtype
        return out

    with trainer.mode.autocast(trainer.device):
        d = denoise(raw, images, sigma, labels)
        losses = trainer.loss_fn(trainer.net, (images, labels), sigma, torch.Generator().manual_seed(0))
    assert seen["f"] == torch.bfloat16
    assert d.dtype == torch.float32  # c_skip z + c_out F in fp32 (type promotion of fp32 scalings)
    assert losses.dtype == torch.float32  # w(sigma) and the squared error in fp32
    out = trainer.step((images, labels))
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.opt.state.values() for v in s.values() if v.ndim)
    assert out["losses"].dtype == torch.float32


def test_fp32_mode_is_the_plain_step_bit_for_bit():
    """train.precision=fp32 (the default) passes autocast and the scaler through: the same weights
    as a trainer built with no mode at all after several steps."""
    run = _run("dit")
    spec = model_plans(run)["blocks"][0]
    a, b = make_trainer(run, spec), make_trainer(run, spec)
    b.mode, b.scaler = MODES["fp32"], MODES["fp32"].scaler(b.device)
    assert not a.scaler.is_enabled() and a.mode.dtype is None
    batch = _batch(run)
    for _ in range(3):
        a.step(batch), b.step(batch)
    for (k, x), (_, y) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(x, y), k
    assert "grad_scaler" not in a.state_dict()[1]


# A loss-scaled mode that runs on CPU (fp16 itself is CUDA-only): the scaler logic is device-independent.
SCALED_CPU = Mode("scaled-bf16", torch.bfloat16, scaled=True)


def _scaled_trainer(run, spec):
    trainer = make_trainer(run, spec)
    trainer.mode, trainer.scaler = SCALED_CPU, SCALED_CPU.scaler(trainer.device)
    return trainer


def test_a_scaled_step_that_overflows_is_skipped_and_the_scale_backs_off():
    run = _run("dit")
    spec = model_plans(run)["blocks"][0]
    trainer = _scaled_trainer(run, spec)
    huge = torch.finfo(torch.float32).max  # any gradient entry above 1 in magnitude overflows
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=huge)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.step(_batch(run))
    assert all(torch.equal(before[k], v) for k, v in trainer.net.state_dict().items())  # skipped
    assert trainer.scaler.get_scale() == pytest.approx(huge * 0.5)  # backed off by its factor 0.5
    trainer.step(_batch(run))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.step(_batch(run))
    assert not all(torch.equal(before[k], v) for k, v in trainer.net.state_dict().items())  # a real step


def test_a_scaled_run_resumes_bit_exactly_with_its_loss_scale():
    run = _run("dit")
    spec = model_plans(run)["blocks"][0]
    batch = _batch(run)
    straight = _scaled_trainer(run, spec)
    for _ in range(4):
        straight.step(batch)
    first = _scaled_trainer(run, spec)
    for _ in range(2):
        first.step(batch)
    tensors, meta = first.state_dict()
    assert "grad_scaler" in meta and meta["grad_scaler"]["scale"] == first.scaler.get_scale()
    resumed = _scaled_trainer(run, spec)
    resumed.load_state_dict(tensors, meta)
    for _ in range(2):
        resumed.step(batch)
    a, b = straight.state_dict()[0], resumed.state_dict()[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.scaler.state_dict() == resumed.scaler.state_dict()


def test_fp16_is_refused_off_cuda_in_one_line():
    with pytest.raises(ConfigError, match=r"^train.precision=fp16: needs CUDA") as e:
        _run("dit", precision="fp16", device="cpu")
    assert "\n" not in str(e.value)
    run = _run("dit", precision="fp16")  # device=auto: known only where the worker runs
    spec = model_plans(run)["blocks"][0]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train.precision=fp16: needs CUDA .* use bf16 or fp32"):
            make_trainer(run, spec, device="cpu")


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match=r"train.precision='fp8': must be one of fp32, bf16, fp16"):
        _run("dit", precision="fp8")
    assert mode_for("bf16").dtype == torch.bfloat16 and mode_for("fp16").scaled


# ---- compile ---------------------------------------------------------------------------------------
def test_a_compiled_block_trains_like_the_eager_one():
    """``train.compile``: the compiled network keeps its parameter names (checkpoints load either
    way) and a few steps land within float tolerance of eager (kernels may fuse differently)."""
    run, compiled = _run("dit"), _run("dit", compile=True)
    spec = model_plans(run)["blocks"][0]
    eager, fast = make_trainer(run, spec), make_trainer(compiled, spec)
    assert fast.state_dict()[0].keys() == eager.state_dict()[0].keys()
    batch = _batch(run)
    for _ in range(3):
        le, lf = eager.step(batch)["loss"], fast.step(batch)["loss"]
        assert lf == pytest.approx(le, rel=1e-3)
    for (k, x), (_, y) in zip(eager.net.state_dict().items(), fast.net.state_dict().items()):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-5), k


def test_the_debug_job_runs_compiled_in_bf16_with_checkpointing(tmp_path):
    """``train.compile=true`` (with bf16 and activation checkpointing) through the whole job: plan,
    inline workers, checkpoints, export, registry, sampling, evaluation."""
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "coordinator", *TINY_DEBUG_JOB, f"output_dir={out_dir}"]
    cmd += ["train.threads=1", "train.compile=true", "train.precision=bf16", "train.activation_checkpointing=true"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["registered"]) == {"blocks/0", "blocks/1"}
    assert math.isfinite(metrics["results"]["DiffusionBlocks B=2"]["heldout_loss"]), metrics["results"]
