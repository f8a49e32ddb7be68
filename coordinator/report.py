"""What the run shows a person: a metrics table on the console, a sample grid PNG, metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from dblocks.config import RunConfig
from dblocks.data import unscale_pixels
from worker.redaction import redact_config


def save_grid(samples: torch.Tensor, path: Path, *, columns: int, scale: int = 4) -> Path:
    """Samples (N, C, H, W) in [-1, 1], C = 1 (grey) or 3 (RGB) -> a PNG in their own colour,
    ``columns`` per row on a white 1-pixel grid, upscaled ``scale``x."""
    n, c, h, w = samples.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid: {c} channels; images are grey (1) or RGB (3)")
    rows = (n + columns - 1) // columns
    canvas = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i, img in enumerate(unscale_pixels(samples)):
        r, col = divmod(i, columns)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def show_samples(cfg: RunConfig, res: dict, folder: Path, image: str = "samples.png", text: str = "sample.txt"):
    """Write what a set generated into ``folder``: an image grid in the data's shape and colour (a
    row per class, at most 10 columns) as ``image``, or the text as ``text``. None if neither."""
    if torch.is_tensor(res.get("samples")):
        samples, per = res["samples"], cfg.sample.per_class
        shown = min(per, 10)
        rows = samples.reshape(len(samples) // per, per, *samples.shape[1:])[:, :shown]
        return save_grid(rows.flatten(0, 1), folder / image, columns=shown)
    if "sample_text" in res:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / text).write_text(res["sample_text"])
        return folder / text
    return None


def plot_loss_vs_sigma(
    results: dict[str, dict], ranges: list[tuple[float, float]], path: Path, space: str
) -> Path | None:
    """The held-out loss per level bin of every model that has a curve (``heldout_loss_curve``) on
    one log axis, each block's range shaded and labelled: where each block works, and how the chain
    compares with the end-to-end model across the levels. None when no model has a curve."""
    curves = {name: r["heldout_loss_curve"] for name, r in results.items() if "heldout_loss_curve" in r}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, (lo, hi) in enumerate(ranges):
        ax.axvspan(lo, hi, color=f"C{i % 10}", alpha=0.12, lw=0)
        ax.text((lo * hi) ** 0.5, 1.0, f"block {i}", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
    for name, c in curves.items():
        e = c["edges"]
        centres = [(a * b) ** 0.5 for a, b in zip(e, e[1:])]
        ax.plot(centres, c["loss"], marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"noise level {space} (log)")
    ax.set_ylabel("held-out weighted loss (Eq. 6)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
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
    """``metrics.json``: the figures and ``extra`` (run id, config, timings), URL passwords masked."""
    clean = {n: {k: v for k, v in r.items() if not torch.is_tensor(v)} for n, r in results.items()}
    path.write_text(json.dumps(redact_config({**extra, "results": clean}), indent=2))
    return path
