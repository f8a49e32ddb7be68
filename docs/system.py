"""Draw docs/system.png, the picture of the system in the README: python docs/system.py"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "system.png"

# name: (x, y, width, height, colour, title, lines) in axis units (0..16 x 0..10)
BOXES = {
    "cli": (0.3, 8.3, 3.4, 1.4, "#eeeeee", "you", ["python -m coordinator ...", "deploy/submit.sh (ray job submit)"]),
    "coord": (
        5.2,
        7.9,
        5.6,
        1.9,
        "#cfe2f3",
        "coordinator (driver)",
        ["plan: sigma range + layers per block", "work units, restarts, progress", "the only MLflow writer"],
    ),
    "redis": (
        0.3,
        4.5,
        4.4,
        2.3,
        "#f4cccc",
        "Redis run store",
        [
            "manifest (config, plan, shards)",
            "units stream per block (XACK)",
            "lease + heartbeat, progress",
            "metrics stream per block",
        ],
    ),
    "mlflow": (
        11.3,
        4.5,
        4.4,
        2.3,
        "#d9ead3",
        "MLflow",
        [
            "parent run + a child run per block",
            "metrics, loss vs sigma, samples",
            "registry: <name>-block<b>",
            "aliases candidate / champion",
        ],
    ),
    "b0": (5.6, 3.9, 1.5, 1.1, "#fff2cc", "blocks/0", ["sigma high"]),
    "b1": (7.3, 3.9, 1.5, 1.1, "#fff2cc", "blocks/1", ["sigma mid"]),
    "b2": (9.0, 3.9, 1.5, 1.1, "#fff2cc", "blocks/2", ["sigma low"]),
    "e2e": (7.3, 2.55, 1.5, 0.95, "#fce5cd", "e2e/0", ["baseline"]),
    "ext": (
        0.3,
        1.9,
        4.4,
        1.5,
        "#fff2cc",
        "external worker",
        ["python -m worker block=K run=<id>", "(any machine, e.g. a small GPU)"],
    ),
    "sampler": (
        11.3,
        7.9,
        4.4,
        1.9,
        "#d9d2e9",
        "sampler actor",
        [
            "loads the B blocks of an alias",
            "chains them (Euler, one block per sigma)",
            "evaluates; champion if it passes",
        ],
    ),
    "storage": (
        5.2,
        0.2,
        5.6,
        1.4,
        "#e6e6e6",
        "storage (path, s3://, gs://)",
        ["data shards (parquet), checkpoints, exported blocks"],
    ),
}


def box(ax, x, y, w, h, colour, title, lines):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05,rounding_size=0.15", fc=colour, ec="#444"))
    ax.text(x + w / 2, y + h - 0.28, title, ha="center", va="center", fontsize=10.5, weight="bold")
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.65 - 0.36 * i, line, ha="center", va="center", fontsize=8.3)


def arrow(ax, a, b, label="", both=False, rad=0.0, dy=0.0):
    ax.add_patch(
        FancyArrowPatch(
            a,
            b,
            arrowstyle="<|-|>" if both else "-|>",
            mutation_scale=11,
            lw=1.1,
            color="#333",
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if label:
        ax.text(
            (a[0] + b[0]) / 2,
            (a[1] + b[1]) / 2 + dy,
            label,
            ha="center",
            va="center",
            fontsize=7.6,
            color="#222",
            bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 0.5},
        )


def draw(path: Path = OUT) -> None:
    fig, ax = plt.subplots(figsize=(13, 8.2))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 10)
    ax.axis("off")
    # the Ray cluster: the coordinator's actors
    ax.add_patch(FancyBboxPatch((5.3, 2.3), 5.5, 3.0, boxstyle="round,pad=0.05", fc="none", ec="#888", ls="--"))
    ax.text(
        5.45, 2.95, "Ray actors,\none per block;\nno tensors\nbetween them", fontsize=7.5, color="#555", va="center"
    )
    for b in BOXES.values():
        box(ax, *b)
    arrow(ax, (3.7, 9.0), (5.2, 9.0), "runs")
    arrow(ax, (5.6, 7.9), (3.5, 6.8), "manifest + units")
    arrow(ax, (9.9, 7.9), (11.9, 6.8), "metrics, params,\nregister blocks", dy=0.15)
    arrow(ax, (4.7, 5.0), (5.6, 4.6), "units / progress,\nmetrics", both=True, dy=-0.45)
    arrow(ax, (8.0, 7.9), (8.0, 5.3), "start, restart (Ray)")
    arrow(ax, (2.5, 3.4), (2.5, 4.5), "units / progress", both=True)
    arrow(ax, (8.0, 2.3), (8.0, 1.6), "checkpoints, exports", both=True, dy=0.0)
    arrow(ax, (4.7, 2.4), (5.2, 1.1), "shards, checkpoints", both=True, rad=0.2)
    arrow(ax, (14.2, 6.8), (14.2, 7.9), "models:/<name>-block<b>@candidate")
    arrow(ax, (10.8, 8.85), (11.3, 8.85), both=True)
    ax.text(11.05, 9.55, "evaluate,\nresults", ha="center", va="center", fontsize=7.6)
    ax.text(
        8.0,
        9.95,
        "dblocks: B blocks trained apart, chained at inference",
        ha="center",
        va="center",
        fontsize=12,
        weight="bold",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw()
    print(f"wrote {OUT}")
