"""The GPU path's headline figures: block vs end-to-end peak memory and step time, with and without
activation checkpointing, bf16 vs fp32, and how deep a model fits under a memory cap.

The model is the RGB 32x32 DiT preset (``experiment=dit_cifar``: DiT-S/2, 3x32x32, 10 classes,
L=12); on CUDA at full size (width 384, batch 128), on CPU at a reduced width and batch so CI can
run ``--quick``. Every trainer is the real one (``dblocks.build.make_trainer``: the run's precision,
checkpointing and optimizer), every figure is taken in ONE process, side by side:

peak memory   the most tensor bytes alive at once during one training step (the second: AdamW's
              state exists), parameters, gradients, AdamW state and EMA included. CUDA:
              ``torch.cuda.max_memory_allocated`` after a reset. CPU: the same quantity counted by a
              ``TorchDispatchMode`` that tracks every tensor an op returns until it is freed (the
              allocator's own caching, which max_memory_allocated also leaves out, is not counted).
memory_ratio  the largest block's peak / the end-to-end model's, B in {2, 3, 4} (target <= 1.1/B).
checkpointed  the same with ``train.activation_checkpointing`` on both sides.
peer          one block WITHOUT checkpointing vs the end-to-end model WITH it (what a user would do
              instead of DiffusionBlocks): memory and step time.
time_ratio    the slowest block's median step time / the end-to-end model's (interleaved rounds).
bf16          bf16 step time / fp32 step time, end-to-end and per block.
capacity      at fixed width and batch, the deepest model whose largest block trains under a fixed
              memory cap / the deepest end-to-end model under the same cap (target >= 0.9 B).
fits          DiT-S/2 at batch 128 in fp32: peak memory of the end-to-end model and of one block
              (CUDA: measured; CPU: a straight line through two small batches, which is exact up to
              the per-batch constant since every activation is linear in the batch).

    python bench/gpu.py                          # CPU: writes bench/results/gpu.json (runs.cpu) + gpu.md
    python bench/gpu.py --device cuda            # the full size on a GPU (runs.cuda)
    python bench/gpu.py --quick --out /tmp/x     # CI smoke, < ~1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dblocks.build import make_trainer, model_plans
from dblocks.config import resolve_device
from worker.config import load_run_config

sys.path.insert(0, str(Path(__file__).parent))
from memory import interleaved  # noqa: E402  (bench/memory.py: the interleaved timing rounds)

BLOCK_COUNTS = (2, 3, 4)
MEMORY_TARGET = 1.1  # x 1/B, asserted at B=3 (issue 12)
CAPACITY_TARGET = 0.9  # x B, reported
L = 12


def run_config(layers: int, blocks: int, size: dict, *, batch: int, device: str, **train):
    """The dit_cifar preset's model at ``layers`` depth, ``blocks`` blocks (no data is read)."""
    model = {"family": "dit", "size": "s2", "image_size": 32, "channels": 3, "num_classes": 10, **size}
    return load_run_config(
        {
            "name": "gpu-bench",
            "model": {**model, "layers": layers},
            "data": {"path": "in-memory"},
            "blocks": {"num": blocks},
            "train": {"batch_size": batch, "device": device, **train},
        }
    )


def trainers(layers: int, blocks: int, size: dict, *, batch: int, device: torch.device, first=False, **train):
    """One trainer per block of a ``blocks``-block plan (blocks=1: the end-to-end model), built
    lazily; ``first``: block 0 only (every DiT block has the same shapes: embeddings, L/B layers, head)."""
    cfg = run_config(layers, blocks, size, batch=batch, device=str(device), **train)
    specs = model_plans(cfg)["e2e" if blocks == 1 else "blocks"]
    return (make_trainer(cfg, spec, baseline=blocks == 1, device=device) for spec in specs[: 1 if first else None])


def make_batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    return images.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: every storage an op returns is counted until its last
    tensor is freed; ``track`` adds tensors that existed before (parameters, gradients, state)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}  # storage address -> live tracked tensors on it
        self._tracked: weakref.WeakSet = weakref.WeakSet()

    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t in self._tracked or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        self._tracked.add(t)
        if self._refs.get(ptr, 0) == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self._refs[ptr] = self._refs.get(ptr, 0) + 1
        weakref.finalize(t, self._release, ptr, size)

    def _release(self, ptr: int, size: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def state_tensors(trainer) -> list[torch.Tensor]:
    """What a trainer holds between steps: parameters, gradients, EMA and optimizer state."""
    params = list(trainer.net.parameters())
    opt = [v for s in trainer.opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return [*params, *(p.grad for p in params if p.grad is not None), *trainer.ema.parameters(), *opt]


def peak_bytes(trainer, batch: tuple) -> int:
    """Peak tensor bytes of one training step (after a first step has created AdamW's state)."""
    trainer.step(batch)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer.step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with LiveBytes() as counter:
        for t in state_tensors(trainer):
            counter.track(t)
        counter.track(batch[0]), counter.track(batch[1])
        trainer.step(batch)
    return counter.peak


def largest_peak(layers: int, blocks: int, size: dict, batch: tuple, device, first=False, **train) -> int:
    """The largest block's peak (each block built, measured and freed in turn)."""
    built = trainers(layers, blocks, size, batch=len(batch[0]), device=device, first=first, **train)
    return max(peak_bytes(trainer, batch) for trainer in built)


def deepest(fits, start: int, limit: int) -> int:
    """The largest depth k in [1, limit] with ``fits(k)`` (fits is monotone: deeper never fits better)."""
    k = start
    while k > 1 and not fits(k):
        k -= 1
    while k < limit and fits(k + 1):
        k += 1
    return k if fits(k) else 0


def step_times(models: dict, batch: tuple, rounds: int, warmup: int) -> dict:
    """Median seconds per step of each trainer, interleaved rounds (bench/memory.py's)."""

    def step(trainer):
        trainer.step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    raw = interleaved({k: functools.partial(step, t) for k, t in models.items()}, rounds, warmup)
    return {k: statistics.median(v) for k, v in raw.items()}


def measure(args) -> dict:
    device = resolve_device(args.device)
    full = device.type == "cuda" and not args.quick
    size = {} if full else {"width": args.width, "heads": 4, "patch": args.patch}  # s2's 384/6/2 on CUDA
    batch = make_batch(args.batch_size, device)
    mib = 2**20

    # -- peak memory per block / end-to-end, with and without checkpointing --------------------------
    mem = {}
    for ac in (False, True):
        for B in (1, *BLOCK_COUNTS):
            mem[(B, ac)] = largest_peak(L, B, size, batch, device, activation_checkpointing=ac)
    memory = {
        str(B): {
            "memory_ratio": mem[(B, False)] / mem[(1, False)],
            "checkpointed_ratio": mem[(B, True)] / mem[(1, True)],
            "peer_memory_ratio": mem[(B, False)] / mem[(1, True)],
            "block_peak_mib": mem[(B, False)] / mib,
            "block_checkpointed_peak_mib": mem[(B, True)] / mib,
            "target": f"memory_ratio <= {MEMORY_TARGET}/B = {MEMORY_TARGET / B:.3f}",
        }
        for B in BLOCK_COUNTS
    }
    e2e_mem = {"peak_mib": mem[(1, False)] / mib, "checkpointed_peak_mib": mem[(1, True)] / mib}

    # -- step time: e2e (fp32, +AC, bf16) and one block per B (fp32, bf16), interleaved ---------------
    def first(B, **train):
        return next(trainers(L, B, size, batch=args.batch_size, device=device, first=True, **train))

    models = {("e2e", "fp32"): first(1), ("e2e", "fp32+ac"): first(1, activation_checkpointing=True)}
    models[("e2e", "bf16")] = first(1, precision="bf16")
    for B in BLOCK_COUNTS:
        models[(B, "fp32")] = first(B)
        models[(B, "bf16")] = first(B, precision="bf16")
    secs = step_times(models, batch, args.rounds, args.warmup)
    del models
    e2e_s = secs[("e2e", "fp32")]
    for B in BLOCK_COUNTS:
        memory[str(B)] |= {
            "time_ratio": secs[(B, "fp32")] / e2e_s,
            "peer_time_ratio": secs[(B, "fp32")] / secs[("e2e", "fp32+ac")],
            "bf16_time_ratio": secs[(B, "bf16")] / secs[(B, "fp32")],
            "block_step_ms": secs[(B, "fp32")] * 1e3,
        }
    times = {
        "e2e_step_ms": e2e_s * 1e3,
        "e2e_checkpointed_step_ms": secs[("e2e", "fp32+ac")] * 1e3,
        "e2e_checkpointing_time_ratio": secs[("e2e", "fp32+ac")] / e2e_s,
        "e2e_bf16_time_ratio": secs[("e2e", "bf16")] / e2e_s,
    }

    # -- capacity under a memory cap ------------------------------------------------------------------
    cap = args.cap_mib * mib
    cache: dict = {}

    def block_fits(B: int, k: int) -> bool:  # a B-block model of depth B*k: its largest block has k layers
        if (B, k) not in cache:
            cache[(B, k)] = largest_peak(B * k, B, size, batch, device, first=True)
        return cache[(B, k)] <= cap

    e2e_depth = deepest(functools.partial(block_fits, 1), start=L // 2, limit=4 * L)
    capacity = {}
    for B in BLOCK_COUNTS:
        k = deepest(functools.partial(block_fits, B), start=max(e2e_depth, 1), limit=4 * L)  # k layers a block
        capacity[str(B)] = {"deepest_layers": B * k, "ratio": B * k / e2e_depth if e2e_depth else None}
    capacity_report = {
        "cap_mib": args.cap_mib,
        "e2e_deepest_layers": e2e_depth,
        "blocks": capacity,
        "peak_mib_by_blocks_and_block_depth": {f"B{B}/k{k}": v / mib for (B, k), v in sorted(cache.items())},
        "target": f"ratio >= {CAPACITY_TARGET} B",
    }

    # -- what fits: DiT-S/2, batch 128, fp32 ---------------------------------------------------------
    fits = {}
    for B in (1, *BLOCK_COUNTS) if not args.quick else ():
        if full:
            fits[str(B)] = largest_peak(L, B, {}, make_batch(128, device), device, first=True) / 2**30
        else:  # two small batches, then the line through them at 128
            a, b = (largest_peak(L, B, {}, make_batch(n, device), device, first=True) for n in (2, 4))
            fits[str(B)] = (a + (b - a) / 2 * (128 - 2)) / 2**30
    fits_report = {
        "gib_by_blocks": fits,
        "how": "measured at batch 128" if full else "extrapolated from batch 2 and 4 (linear in the batch)",
    }

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "model": f"DiT-S/2 preset, 3x32x32, L={L}"
        + ("" if full else f", width {args.width}, heads 4, patch {args.patch}"),
        "batch_size": args.batch_size,
        "results": memory,
        "e2e": e2e_mem | times,
        "capacity": capacity_report,
        "fits_dit_s2_batch128_fp32": fits_report,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "command": shlex.join(["python", *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
    }


def markdown(report: dict) -> str:
    lines = ["# Block vs end-to-end on the GPU path (bench/gpu.py)", ""]
    for kind, r in report["runs"].items():
        e2e, cap, fits = r["e2e"], r["capacity"], r["fits_dit_s2_batch128_fp32"]
        lines += [
            f"## {kind} ({r['device_name'] or r['device']}): {r['model']}, batch {r['batch_size']}",
            "",
            "| B | memory block/E2E | both checkpointed | block vs E2E+AC (memory) | step time block/E2E "
            "| block vs E2E+AC (time) | bf16/fp32 time (block) | target memory |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for B, x in r["results"].items():
            lines.append(
                f"| {B} | {x['memory_ratio']:.3f} | {x['checkpointed_ratio']:.3f} | {x['peer_memory_ratio']:.3f} "
                f"| {x['time_ratio']:.3f} | {x['peer_time_ratio']:.3f} | {x['bf16_time_ratio']:.3f} "
                f"| <= {MEMORY_TARGET / int(B):.3f} |"
            )
        deep = ", ".join(f"B={B}: {c['deepest_layers']} layers (x{c['ratio']:.2f})" for B, c in cap["blocks"].items())
        fit = ", ".join(f"B={B}: {g:.2f} GiB" for B, g in fits["gib_by_blocks"].items()) or "skipped (--quick)"
        lines += [
            "",
            f"E2E: peak {e2e['peak_mib']:.1f} MiB ({e2e['checkpointed_peak_mib']:.1f} MiB checkpointed), "
            f"{e2e['e2e_step_ms']:.0f} ms/step; checkpointing costs x{e2e['e2e_checkpointing_time_ratio']:.2f} "
            f"step time; bf16/fp32 x{e2e['e2e_bf16_time_ratio']:.2f}.",
            "",
            f"Capacity under {cap['cap_mib']} MiB: E2E {cap['e2e_deepest_layers']} layers; {deep}.",
            "",
            f"DiT-S/2 at batch 128, fp32, peak per worker ({fits['how']}): {fit}.",
            "",
            f"Command: `{r['command']}` (torch {r['torch']}, {r['threads']} threads)",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--quick", action="store_true", help="CI smoke: small width and batch, few rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    args.width, args.patch = (64, 4) if args.quick else (128, 2)
    args.batch_size = 4 if args.quick else (128 if cuda else 8)
    args.cap_mib = 8192 if cuda and not args.quick else (20 if args.quick else 200)
    args.rounds, args.warmup = (2, 1) if args.quick else (9, 2)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    report = measure(args)
    report["wall_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.setdefault("runs", {})[resolve_device(args.device).type] = report  # CPU and CUDA side by side
    path.write_text(json.dumps(merged, indent=2) + "\n")
    md = markdown(merged)
    (args.out / "gpu.md").write_text(md)
    print(md)
    ratio = report["results"]["3"]["memory_ratio"]
    if ratio > MEMORY_TARGET / 3:
        print(f"FAIL: B=3 memory_ratio={ratio:.4f} > {MEMORY_TARGET}/3")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
