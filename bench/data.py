"""Streaming reads, measured: a worker's memory does not grow with the dataset, and streaming costs
no training throughput.

Two prepared datasets of random 3x32x32 uint8 images, N and 10 N rows, the same shard size
(``dblocks-data`` from ``.npz``). The same model (block 0 of the ``dit_cifar`` preset at
``model.size=debug``, B=2, 1 torch thread) trains on each:

peak RSS    a fresh process per dataset runs the real ``BlockWorker`` (in-memory run store, no-op
            tracker) over enough work units to read every shard of the 10 N dataset; its peak
            resident memory (``ru_maxrss``). Target: 10 N costs < 10% more than N. For contrast
            the same process with the old in-memory reader (the whole train split loaded first).
rows/s      in one process, interleaved repeats of the same units, rows from ``RowPrefetcher``
            (read on demand, the next unit's on a background thread) vs from tensors already in
            memory. Target: streaming / in-memory >= 0.9.

    python bench/data.py            # ~3 min, writes bench/results/data.json
    python bench/data.py --quick    # < 1 min smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coordinator.data import PrepareConfig, prepare  # noqa: E402
from dblocks.build import make_trainer  # noqa: E402
from dblocks.units import make_units  # noqa: E402
from worker.config import load_run_config  # noqa: E402
from worker.prefetch import RowPrefetcher  # noqa: E402


def config(data: str, steps: int, unit_steps: int, out: str) -> dict:
    return {
        "name": "bench-data",
        "output_dir": out,
        "baseline": False,
        "blocks": {"num": 2},
        "model": {"family": "dit", "size": "debug"},
        "data": {"path": data},
        "train": {"steps": steps, "unit_steps": unit_steps, "batch_size": 32, "threads": 1, "device": "cpu"},
    }


def make_dataset(root: Path, rows: int, rows_per_shard: int) -> str:
    """Random uint8 images (and 10 labels) as .npz, prepared into shards of ``rows_per_shard`` rows."""
    rng = np.random.default_rng(rows)
    npz = root / f"x{rows}.npz"
    np.savez(npz, x=rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, rows))
    out = root / f"data{rows}"
    prepare(PrepareConfig(input=str(npz), output=str(out), test_size=64, rows_per_shard=rows_per_shard))
    return str(out)


# ---- peak RSS: one fresh process per (dataset, reader) ---------------------------------------------
def child(mode: str, cfg_dict: dict) -> dict:
    """Train block 0 over every unit in this process; its peak RSS in MiB."""
    from coordinator.run import new_run, open_data
    from coordinator.tracking import NullTracker
    from worker.block_worker import BlockWorker
    from worker.record import JobId
    from worker.storage import Storage
    from worker.store import MemoryStore

    torch.set_num_threads(1)
    cfg = load_run_config(cfg_dict)
    storage = Storage(str(Path(cfg.output_dir) / "storage"))
    cfg, data = open_data(cfg, storage)
    if mode == "stream":  # the real worker
        store = MemoryStore()
        run = new_run(cfg, store, NullTracker(), storage, data).run_id
        BlockWorker(store, run, JobId("blocks", 0), consumer="bench").run()
    else:  # the old reader: the whole train split in memory, then the same units
        from dblocks.build import model_plans
        from dblocks.seeds import derive_seed
        from dblocks.units import apply_unit

        spec = model_plans(cfg)["blocks"][0]
        rows = data.split("train")
        offsets, start = {}, 0
        for s in data.train_shards():
            offsets[s.path], start = start, start + s.rows
        trainer = make_trainer(cfg, spec)
        for u in make_units(
            cfg.train.steps, cfg.train.unit_steps, data.train_shards(), derive_seed(cfg.seed, "blocks"), 0
        ):
            a = offsets[u.shard]
            apply_unit(trainer, u, tuple(c[a + u.row_start : a + u.row_end] for c in rows))
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def peak_rss(mode: str, cfg_dict: dict) -> float:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--config", json.dumps(cfg_dict)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


# ---- rows/s: streaming vs in memory, interleaved in one process -------------------------------------
def rows_per_second(cfg_dict: dict, repeats: int) -> dict:
    from coordinator.run import open_data
    from dblocks.build import model_plans
    from dblocks.seeds import derive_seed
    from dblocks.units import apply_unit
    from worker.storage import Storage

    torch.set_num_threads(1)
    cfg = load_run_config(cfg_dict)
    cfg, data = open_data(cfg, Storage(str(Path(cfg.output_dir) / "storage")))
    spec = model_plans(cfg)["blocks"][0]
    shards = data.train_shards()
    units = make_units(cfg.train.steps, cfg.train.unit_steps, shards, derive_seed(cfg.seed, "blocks"), 0)
    memory = {s.path: data.read_rows(s.path, 0, s.rows) for s in shards}

    def once(streaming: bool) -> float:
        trainer = make_trainer(cfg, spec)
        t0 = time.perf_counter()
        with RowPrefetcher(data, seq_len=None) as reader:
            for k, u in enumerate(units):
                if streaming:
                    rows = reader.rows(u)
                    if k + 1 < len(units):
                        reader.prefetch(units[k + 1])
                else:
                    rows = tuple(c[u.row_start : u.row_end] for c in memory[u.shard])
                apply_unit(trainer, u, rows)
        return cfg.train.steps * cfg.train.batch_size / (time.perf_counter() - t0)

    once(False)  # warm-up
    rates = {"stream": [], "memory": []}
    for _ in range(repeats):
        for mode in ("stream", "memory"):
            rates[mode].append(once(mode == "stream"))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rows_per_s": med, "raw": rates, "stream_over_memory": med["stream"] / med["memory"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    ap.add_argument("--rows", type=int, default=2000, help="N: rows of the small dataset (the large has 10 N)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--child", choices=("stream", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.config))))
        return
    n = 400 if args.quick else args.rows
    per_shard = n // 4
    unit_steps = 2 if args.quick else 5
    steps = 10 * n // per_shard * unit_steps  # one unit per shard of the 10 N dataset: every shard is read
    tmp = Path(tempfile.mkdtemp(prefix="dblocks-bench-data-"))
    small, large = make_dataset(tmp, n, per_shard), make_dataset(tmp, 10 * n, per_shard)
    rss = {}
    for mode in ("stream", "memory"):
        for name, path in (("N", small), ("10N", large)):
            rss[f"{mode}/{name}"] = peak_rss(mode, config(path, steps, unit_steps, str(tmp / f"{mode}-{name}")))
    speed = rows_per_second(config(large, steps, unit_steps, str(tmp / "speed")), 1 if args.quick else 3)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "rows": {"N": n, "10N": 10 * n},
        "rows_per_shard": per_shard,
        "steps": steps,
        "unit_steps": unit_steps,
        "peak_rss_mb": rss,
        "stream_rss_10N_over_N": rss["stream/10N"] / rss["stream/N"],
        "memory_rss_10N_over_N": rss["memory/10N"] / rss["memory/N"],
        **speed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
