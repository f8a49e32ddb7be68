"""The console scripts work from the installed package, from any working directory (not the repo)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import TINY_DEBUG_JOB
from worker.config import config_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cli(name: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    script = BIN / name
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_configs_are_found_outside_the_repo():
    assert (Path(config_dir()) / "config.yaml").is_file()
    assert {p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml")} >= {"debug", "dit_digits"}


def test_run_help_lists_the_groups(tmp_path):
    out = cli("dblocks-run", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "model: ar, dit, mdm, recurrent, vit" in out.stdout and "experiment: ar_text, debug" in out.stdout


def test_run_prints_the_composed_config_without_starting_anything(tmp_path):
    out = cli("dblocks-run", "experiment=vit_digits", "train.steps=7", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: vit-digits" in out.stdout and "family: vit" in out.stdout and "steps: 7" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written: no outputs/, no services


def test_a_bad_override_names_its_key(tmp_path):
    assert one_line_error(cli("dblocks-run", "train.lr=abc", cwd=tmp_path)) == "error: train.lr=abc: expected a number"
    assert list(tmp_path.iterdir()) == []  # refused before Hydra made a run directory


def test_a_broken_rule_is_one_line(tmp_path):
    assert "blocks.num=4: must divide model.layers=6" in one_line_error(
        cli("dblocks-run", "experiment=debug", "blocks.num=4", cwd=tmp_path)
    )
    assert "only=[5]: block 5 is not in 0..1" in one_line_error(
        cli("dblocks-run", "experiment=debug", "only=[5]", cwd=tmp_path)
    )


def test_sample_composes(tmp_path):
    out = cli("dblocks-sample", "experiment=debug", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "alias: champion" in out.stdout and "name: debug" in out.stdout


def test_sample_refuses_a_family_without_image_denoisers(tmp_path):
    assert "model.family=vit" in one_line_error(cli("dblocks-sample", "experiment=vit_digits", cwd=tmp_path))


def test_worker_without_a_run_points_to_the_coordinator(tmp_path):
    line = one_line_error(cli("dblocks-worker", "block=0", cwd=tmp_path))
    assert "run=<run id>" in line and "dblocks-run experiment=... only=[0]" in line
    assert "block=" in one_line_error(cli("dblocks-worker", cwd=tmp_path))
    assert "redis.url" in one_line_error(cli("dblocks-worker", "block=0", "run=abc", cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []  # a worker leaves no Hydra run directory where it starts


def test_the_wheel_ships_the_configs(tmp_path):
    """``pip wheel .`` (without network: the build backend is already installed) holds every YAML file."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for d in ("dblocks", "coordinator", "worker", "configs"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
        str(src),
    ]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dblocks-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}


# A progress line off a terminal (coordinator/progress.py): "<time> blocks/0  samples 32/160  units 1/5 ... <state>".
PROGRESS_LINE = re.compile(r"^\S+ ((?:blocks|baseline)/\d+)\s+samples \S+\s+units (\S+)\s.* (\w+)$")
# What a library's warning looks like on the console: the warnings module's "<file>:<line>: XWarning: ...",
# or a library logger's own "WARNING" record (MLflow's handler prints its level).
LIBRARY_WARNING = re.compile(r"\w+Warning\b|\bWARNING\b|warnings\.warn")


def test_the_debug_run_end_to_end_and_its_console_is_clean(tmp_path):
    """The whole job in one process: embedded redis-server, sqlite MLflow, inline workers, a tiny
    budget (4 units a block). Its console, captured off a terminal: no library warning, and a progress
    line for a block only when its units or state changed."""
    out_dir = tmp_path / "out"
    job = [a for a in TINY_DEBUG_JOB if not a.startswith("train.steps=")] + ["train.steps=40"]
    result = cli("dblocks-run", *job, f"output_dir={out_dir}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out_dir / "mlflow.db").is_file()
    assert (out_dir / "metrics.json").is_file()

    console = (result.stdout + result.stderr).splitlines()
    assert not [line for line in console if LIBRARY_WARNING.search(line)], "\n".join(console)
    shown: dict[str, list[tuple[str, str]]] = {}
    for line in console:
        if m := PROGRESS_LINE.match(line):
            shown.setdefault(m[1], []).append((m[2], m[3]))
    assert sorted(shown) == ["blocks/0", "blocks/1"], "\n".join(console)
    for block, changes in shown.items():
        assert all(a != b for a, b in zip(changes, changes[1:])), (block, changes)  # one line per change
        assert changes[-1] == ("4/4", "done"), (block, changes)


def test_data_prepares_a_built_in_set_and_names_a_bad_input(tmp_path):
    out = cli("dblocks-data", "input=builtin:digits", f"output={tmp_path / 'digits'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "images 1x8x8, 10 classes, 1437 train / 360 test" in out.stdout
    assert (tmp_path / "digits" / "card.json").exists() and not (tmp_path / "outputs").exists()
    line = one_line_error(
        cli("dblocks-data", f"input={tmp_path / 'missing'}", f"output={tmp_path / 'x'}", cwd=tmp_path)
    )
    assert "missing" in line and not (tmp_path / "x").exists()
