"""Bad input ends in one line naming the key, exit status 2, never a traceback.

Each case runs the coordinator's entry point (``dblocks-run``'s ``main``) in this process, on the
in-memory run store and inline workers, so a case costs the config check and the preflight only;
a few run the installed console script as a subprocess, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from services import error_lines
from test_cli import cli, one_line_error

from coordinator.__main__ import main
from coordinator.lock import OutputLock


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, list[str], str]:
    """``dblocks-run <args>`` in this process: (exit status, the lines it said besides logging, all stderr)."""
    monkeypatch.setattr(sys, "argv", ["dblocks-run", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    said = error_lines(subprocess.CompletedProcess(args, info.value.code, captured.out, captured.err))
    return info.value.code, said, captured.err + captured.out


def base(tmp_path: Path, name: str) -> list[str]:
    """A debug run on this test's in-memory store and output directory."""
    return [
        "workers.backend=inline",
        f"redis.url=memory://{name}",
        f"output_dir={tmp_path / 'out'}",
        "baseline=false",
        "train.steps=10",
        "train.unit_steps=10",
        "train.checkpoint_every=10",
        "train.batch_size=16",
    ]


def assert_one_line(code: int, lines: list[str], everything: str, *expected: str) -> str:
    assert "Traceback" not in everything, everything[-3000:]
    assert code == 2, everything[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), everything[-3000:]
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


FILE = "a-regular-file"  # a path under a regular file cannot be a directory, for any user (root included)

CASES = [
    # wrong types and unknown keys, refused before Hydra composes (the key and the expected type named)
    ("train.lr=abc", "train.lr=abc: expected a number"),
    ("seed=abc", "seed=abc: expected an integer"),
    ("train.steps=1.5", "train.steps=1.5: expected an integer"),
    ("blocks.num=two", "blocks.num=two: expected an integer"),
    ("baseline=maybe", "baseline=maybe: expected true or false"),
    ("workers.external=abc", "workers.external=abc: expected a list"),
    ("workers.num_cpus=many", "workers.num_cpus=many: expected a number"),
    ("train.foo=1", "train.foo=1: no such setting"),
    ("model.seq_len=3", "model.seq_len=3: no such setting"),
    ("model=nope", "model=nope: no such option; choose one of ar, dit"),
    ("redis.url=redis://:hunter2@[x", "redis.url=redis://:***@[x: Hydra cannot parse"),
    # the config's rules
    ("blocks.num=4", "blocks.num=4: must divide model.layers=6"),
    ("train.lr=-1", "train.lr=-1.0: must be > 0"),
    ("train.device=tpu", "train.device='tpu'"),
    ("redis.url=redis://127.0.0.1:abc/0", "redis.url: malformed"),
    ("redis.url=redis://127.0.0.1:6379/x", "redis.url: database 'x' is not a number"),
    ("redis.url=127.0.0.1:6379", "redis.url: scheme (none) is not a run store"),
    ("redis.url=http://127.0.0.1:6379/0", "redis.url: scheme http:// is not a run store"),
    ("redis.url=redis:///0", "redis.url: no host"),
    # the preflight: addresses, stores, writable places
    ("mlflow.tracking_uri=foo://x", "mlflow.tracking_uri=foo://x: cannot open the tracking store"),
    ("mlflow.tracking_uri=sqlite://relative.db", "mlflow.tracking_uri=sqlite://relative.db: cannot open"),
    ("mlflow.tracking_uri=http://", "mlflow.tracking_uri=http://: cannot reach the tracking server"),
    ("mlflow.tracking_uri=http://127.0.0.1:1", "mlflow.tracking_uri=http://127.0.0.1:1: cannot reach"),
    ("storage.path=foo://bucket/x", "storage.path='foo://bucket/x': Unrecognized filesystem type"),
    (f"storage.path={{tmp}}/{FILE}/storage", "storage.path=", "cannot write there"),
    (f"output_dir={{tmp}}/{FILE}/out", "output_dir=", "cannot write there"),
    ("resume=no-such-run", "no-such-run"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0].replace("{tmp}", "") for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys):
    override, *expected = case
    (tmp_path / FILE).write_text("not a directory")
    override = override.replace("{tmp}", str(tmp_path))
    key = override.split("=", 1)[0]
    args = [a for a in base(tmp_path, tmp_path.name) if a.split("=", 1)[0] != key]
    code, lines, everything = run_main(monkeypatch, capsys, "experiment=debug", *args, override)
    assert_one_line(code, lines, everything, *expected)
    assert "hunter2" not in everything


def test_an_unknown_experiment_lists_them(tmp_path, monkeypatch, capsys):
    code, lines, everything = run_main(monkeypatch, capsys, "experiment=nope", f"output_dir={tmp_path}")
    assert_one_line(code, lines, everything, "experiment=nope: no such option; choose one of ar_text, debug")


def test_a_second_coordinator_on_the_output_dir_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):  # a live coordinator on the directory (here: this process)
        code, lines, everything = run_main(monkeypatch, capsys, "experiment=debug", *base(tmp_path, "locked"))
    line = assert_one_line(code, lines, everything, f"output_dir={out}: in use by coordinator pid")
    assert "choose another output_dir" in line


@pytest.fixture
def started_run(tmp_path):
    """A run opened (manifest and units in the in-memory store) but not trained: what resume finds."""
    from hydra import compose, initialize_config_dir

    from coordinator.run import new_run, open_data
    from coordinator.tracking import NullTracker
    from worker.config import config_dir, load_command, register
    from worker.storage import Storage
    from worker.store import open_store

    register()
    args = ["experiment=debug", *base(tmp_path, "resumed")]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg, _ = load_command(compose("config", overrides=args))
    storage = Storage(str((tmp_path / "out" / "storage").resolve()))
    cfg, data = open_data(cfg, storage)
    manifest = new_run(cfg, open_store(cfg.redis.url), NullTracker(), storage, data)
    return args, manifest.run_id


@pytest.mark.parametrize(
    "override, was",
    [("train.steps=50", "train.steps=10"), ("train.lr=0.01", "train.lr=0.001"), ("seed=5", "seed=0")],
)
def test_resume_refuses_other_training_settings(override, was, started_run, monkeypatch, capsys):
    args, run_id = started_run
    code, lines, everything = run_main(monkeypatch, capsys, *args, f"resume={run_id}", override)
    assert_one_line(code, lines, everything, f"error: {override}: run {run_id} was started with {was}")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=abc", "error: train.lr=abc: expected a number"),
        ("redis.url=redis://:hunter2@127.0.0.1:abc/0", "error: redis.url: malformed"),
        ("storage.path=foo://bucket/x", "error: storage.path='foo://bucket/x': Unrecognized filesystem type"),
    ],
)
def test_the_console_script_says_one_line(override, expected, tmp_path):
    result = cli("dblocks-run", "experiment=debug", "workers.backend=inline", override, cwd=tmp_path)
    line = one_line_error(result)
    assert line.startswith(expected) and "Traceback" not in result.stderr and "hunter2" not in result.stderr


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("dblocks-worker", ["block=abc"], "error: block=abc: expected an integer"),
        (
            "dblocks-worker",
            ["block=0", "run=r", "redis.url=redis://:hunter2@127.0.0.1:1/0", "train.lr=abc"],
            "error: train.lr=abc: expected a number",
        ),
        ("dblocks-worker", ["blok=0"], "error: blok=0: no such setting"),
        ("dblocks-sample", ["seed=abc"], "error: seed=abc: expected an integer"),
        ("dblocks-sample", ["sample.steps=1.5"], "error: sample.steps=1.5: expected an integer"),
    ],
)
def test_the_worker_and_sample_scripts_say_one_line(script, args, expected, tmp_path):
    result = cli(script, *args, cwd=tmp_path)
    line = one_line_error(result)
    assert line.startswith(expected) and "Traceback" not in result.stderr and "hunter2" not in result.stderr
