"""What the run shows a person: a metrics table on the console, a sample grid PNG, metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from dblocks.config import RunConfig
from dblocks.data import unscale_pixels


def save_grid(samples: torch.Tensor, path: Path, *, columns: int, scale: int = 4) -> Path:
    """Samples (N, 1, H, W) in [-1, 1] -> a grey PNG, ``columns`` per row, upscaled ``scale``x."""
    n, _, h, w = samples.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i, img in enumerate(unscale_pixels(samples[:, 0])):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    pixels = (canvas * 255).round().to(torch.uint8).numpy()
    im = Image.fromarray(pixels, mode="L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def format_table(results: dict[str, dict], cfg: RunConfig) -> str:
    """One column per model (e.g. 'DiffusionBlocks B=3', 'end-to-end'), one row per metric of the
    run's family (``Family.table_rows``)."""
    names = list(results)
    rows = [(row.label, [row.cell(results[n]) for n in names]) for row in cfg.family.table_rows(cfg)]
    width = max(len(r[0]) for r in rows)
    colw = [max(len(n), 10) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, colw))]
    lines += [label.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(vals, colw)) for label, vals in rows]
    return "\n".join(lines)


def write_metrics(results: dict[str, dict], path: Path, **extra) -> Path:
    clean = {n: {k: v for k, v in r.items() if not torch.is_tensor(v)} for n, r in results.items()}
    path.write_text(json.dumps({**extra, "results": clean}, indent=2))
    return path
