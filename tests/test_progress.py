"""The coordinator's console: ETA from the rate, one line per block per change off a terminal, a
heartbeat when nothing changes, bars with elapsed time and ETA on a terminal."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from coordinator import progress as progress_mod
from coordinator.progress import Progress, clock, eta_seconds


def block(units: int, state: str = "training", samples: int | None = None, rate: float = 100.0) -> dict:
    samples = units * 640 if samples is None else samples
    return {
        "state": state,
        "units_done": str(units),
        "units_total": "10",
        "samples": str(samples),
        "samples_total": "6400",
        "samples_per_s": str(rate),
        "loss": "0.5",
    }


def test_the_eta_is_what_is_left_at_the_current_rate():
    assert eta_seconds(block(4)) == (6400 - 2560) / 100.0
    assert eta_seconds(block(10, state="done")) == 0.0
    assert eta_seconds({"state": "starting", "samples_total": "6400"}) is None  # no rate yet
    assert [clock(s) for s in (None, 5, 65, 3725)] == ["-", "0:05", "1:05", "1:02:05"]


def lines(caplog) -> list[str]:
    out = [r.getMessage() for r in caplog.records if r.name == "coordinator.progress"]
    caplog.clear()
    return out


def test_off_a_terminal_a_block_gets_a_line_only_when_it_changed(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_mod.time, "time", lambda: now[0])
    caplog.set_level(logging.INFO, logger="coordinator.progress")
    show = Progress(interval=60, live=False)
    show.update({"blocks/0": block(1), "blocks/1": block(1)})
    said = lines(caplog)
    assert len(said) == 2 and said[0].startswith("blocks/0  samples 640/6400") and "eta 0:58" in said[0]
    for _ in range(5):  # the same units and states: silent, however often the controller steps
        now[0] += 1
        show.update({"blocks/0": block(1, rate=90.0), "blocks/1": block(1)})
    assert lines(caplog) == []
    now[0] += 1
    show.update({"blocks/0": block(2), "blocks/1": block(1)})
    (line,) = lines(caplog)
    assert line.startswith("blocks/0") and "units 2/10" in line
    now[0] += 61  # nothing changed for a minute: one heartbeat line for the whole run
    show.update({"blocks/0": block(2), "blocks/1": block(1)})
    (beat,) = lines(caplog)
    assert beat == "still running: training, elapsed 1:07, eta 0:58"  # the slower block's
    now[0] += 1
    show.update({"blocks/0": block(2), "blocks/1": block(1)})
    assert lines(caplog) == []


def test_on_a_terminal_each_block_has_a_bar_with_elapsed_time_and_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with Progress(live=True, console=console) as show:
        show.update({"blocks/0": block(4), "blocks/1": block(10, state="done")})
        show.status("registering 2 blocks")
    text = out.getvalue()
    assert "blocks/0" in text and "blocks/1" in text and "registering 2 blocks" in text
    assert "eta    0:38" in text and "40%" in text and "100%" in text and "0:00:0" in text  # elapsed
