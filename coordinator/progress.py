"""The coordinator's console while blocks train.

On a terminal: one rich progress bar per block with its samples, elapsed time, ETA, samples/s,
loss and state, updated in place. Off a terminal (a log file, ``ray job logs``, CI): one line per
block only when its units or state changed, and a heartbeat line when nothing changed for
``interval`` seconds, so a quiet run still shows it is alive. ``status`` says what the run is
doing between the bars (registering, sampling, evaluating), in both modes.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars

log = logging.getLogger(__name__)


def _num(p: dict, key: str) -> float:
    try:
        return float(p.get(key) or 0)
    except ValueError:
        return 0.0


def eta_seconds(p: dict) -> float | None:
    """Seconds left for one block at its current rate (None until it has a rate, 0 when done)."""
    left = _num(p, "samples_total") - _num(p, "samples")
    if p.get("state") == "done" or left <= 0:
        return 0.0
    rate = _num(p, "samples_per_s")
    return left / rate if rate > 0 else None


def clock(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(job: object, p: dict) -> dict[str, str]:
    """One block's progress fields, formatted."""
    return {
        "block": str(job),
        "samples": f"{int(_num(p, 'samples'))}/{int(_num(p, 'samples_total')) or '-'}",  # total: once it starts
        "units": f"{p.get('units_done', 0)}/{p.get('units_total', '?')}",
        "loss": f"{_num(p, 'loss'):.4f}" if p.get("loss") else "-",
        "rate": f"{_num(p, 'samples_per_s'):.0f}" if p.get("samples_per_s") else "-",
        "eta": clock(eta_seconds(p)),
        "state": p.get("state", "?"),
    }


class Progress:
    """``with Progress() as show: show.update({job: progress_hash, ...})`` once per controller step."""

    def __init__(self, interval: float = 60.0, live: bool | None = None, console: Console | None = None):
        self.live_mode = sys.stdout.isatty() if live is None else live
        self.interval = interval
        self.start = self._quiet_since = time.time()
        self._shown: dict[str, tuple] = {}  # per block: what its last line said (units, state)
        self._bars: Bars | None = None
        self._tasks: dict[str, int] = {}
        if self.live_mode:
            self._bars = Bars(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]:>7}  {task.fields[rate]:>6} samples/s  loss {task.fields[loss]:>7}"),
                TextColumn("{task.fields[state]}"),
                console=console or Console(),
                refresh_per_second=4,
            )

    def __enter__(self) -> Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.stop()

    def update(self, progress: dict) -> None:
        """``progress``: each job's progress hash (keys: JobId or its string)."""
        rows = [(describe(job, p), p) for job, p in progress.items()]
        if self._bars is not None:
            for row, p in rows:
                fields = {k: row[k] for k in ("eta", "rate", "loss", "state")}
                total, done = _num(p, "samples_total") or 1.0, _num(p, "samples")
                if row["block"] not in self._tasks:
                    self._tasks[row["block"]] = self._bars.add_task(row["block"], total=total, **fields)
                self._bars.update(self._tasks[row["block"]], total=total, completed=done, **fields)
            return
        now, said = time.time(), False
        for row, _ in rows:
            key = (row["units"], row["state"])
            if self._shown.get(row["block"]) != key:
                self._shown[row["block"]] = key
                log.info(
                    "%-9s samples %-13s units %-7s loss %-7s %6s samples/s  eta %-7s %s",
                    *(row[k] for k in ("block", "samples", "units", "loss", "rate", "eta", "state")),
                )
                said = True
        if said:
            self._quiet_since = now
        elif now - self._quiet_since >= self.interval:
            left = [eta_seconds(p) for _, p in rows]
            eta = None if any(x is None for x in left) else max(left, default=0.0)
            states = sorted({row["state"] for row, _ in rows})
            log.info("still running: %s, elapsed %s, eta %s", "/".join(states), clock(now - self.start), clock(eta))
            self._quiet_since = now

    def status(self, text: str) -> None:
        """What the run does now that no bar shows (registering, sampling, evaluating)."""
        if self._bars is not None:
            self._bars.console.print(f"[bold]{text}[/bold]")
        else:
            log.info("%s", text)
