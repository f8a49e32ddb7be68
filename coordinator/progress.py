"""The coordinator's console: one line per block, updated in place on a terminal (rich), plain
log lines (at most one per block every ``interval`` seconds, and on every state change) otherwise."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

log = logging.getLogger(__name__)


def _fmt(job: object, p: dict) -> list[str]:
    done, total = int(float(p.get("samples", 0))), int(float(p.get("samples_total", 0) or 0))
    loss = f"{float(p['loss']):.4f}" if p.get("loss") else "-"
    rate = f"{float(p['samples_per_s']):.0f}" if p.get("samples_per_s") else "-"
    units = f"{p.get('units_done', 0)}/{p.get('units_total', '?')}"
    return [str(job), f"{done}/{total}", units, loss, rate, p.get("state", "?")]


class Progress:
    COLUMNS = ["block", "samples", "units", "loss", "samples/s", "state"]

    def __init__(self, interval: float = 10.0, live: bool | None = None):
        self.live_mode = sys.stdout.isatty() if live is None else live
        self.interval, self._last, self._state = interval, 0.0, {}
        self._live = Live(console=Console(), refresh_per_second=4, transient=False) if self.live_mode else None

    def __enter__(self) -> "Progress":
        if self._live:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live:
            self._live.stop()

    def update(self, progress: dict) -> None:
        """``progress``: each job's progress hash (keys: JobId or its string)."""
        rows = [_fmt(job, p) for job, p in progress.items()]
        if self._live:
            table = Table(*self.COLUMNS, title="dblocks")
            for r in rows:
                table.add_row(*r)
            self._live.update(table)
            return
        now = time.time()
        changed = {job: p.get("state") for job, p in progress.items()} != self._state
        if changed or now - self._last >= self.interval:
            for r in rows:
                log.info("%-9s samples %-13s units %-7s loss %-7s %6s samples/s  %s", *r)
            self._last, self._state = now, {job: p.get("state") for job, p in progress.items()}
