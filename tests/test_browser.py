"""What a user sees in the MLflow UI, checked in a real browser (headless Chromium).

One short debug job through the real entry point (``python -m coordinator``, inline workers, a
sqlite store under its output dir), then ``mlflow server`` on that store on 127.0.0.1 and
Playwright's client driving Debian's ``/usr/bin/chromium`` (no browser download): the experiment
opens on its runs, the parent run has one child per block, a block run shows its loss and σ-bucket
charts, the parent's artifacts show the loss-vs-σ plot and the sample grids (the final one and one
from the middle of training), and the model registry lists every block with its aliases and
description. Every page is saved as a PNG under the test's tmp dir; with
``DBLOCKS_SCREENSHOTS=docs/screenshots`` the ones the README shows are also written there.

Skipped where Chromium or the ``playwright`` package is missing (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import TINY_DEBUG_JOB, mlflow_client

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="no playwright package (pip install -e .[dev])")
expect = playwright_api.expect

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = os.environ.get("DBLOCKS_SCREENSHOTS")  # a folder for the pictures the README shows
# 2 units of 10 steps per block: 2 points per chart (for the README's pictures: 10 units of 40 steps and a
# 10-column sample grid); eval.every=1: a preview grid while training.
STEPS, UNIT, COLUMNS = (400, 40, 10) if SCREENSHOTS else (20, 10, 2)
RESIZED = ("train.steps=", "train.unit_steps=", "train.checkpoint_every=", "sample.per_class=")
JOB = [
    *(a for a in TINY_DEBUG_JOB if not a.startswith(RESIZED)),
    f"train.steps={STEPS}",
    f"train.unit_steps={UNIT}",
    f"train.checkpoint_every={UNIT}",
    f"sample.per_class={COLUMNS}",
    "eval.every=1",
    "redis.url=memory://browser",
]
BLOCKS = 2  # the debug preset's blocks.num
# MLflow 3.17's UI shows an experiment as GenAI (traces) or model training by this URL parameter, else
# by the browser's last choice (GenAI at first); the experiment's tag is not read (see the first test).
TRAINING_VIEW = "workflowType=machine_learning"
VIEWPORT = {"width": 1400, "height": 860}
WAIT_MS = 30_000  # for any element: the first render of a page fetches the app's chunks
expect.set_options(timeout=WAIT_MS)
# The screenshots that DBLOCKS_SCREENSHOTS=<dir> also writes (the README shows them from docs/screenshots/).
SHOWN = ("runs.png", "block-charts.png", "loss-vs-sigma.png", "samples-during.png", "registry.png")
# What a block's registered-model description must carry (coordinator/tracking.py writes it).
DESCRIPTION_HAS = ("σ", "models:/{name}@champion")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The finished job: its output dir and what its MLflow store holds (ids of the experiment, the
    parent run and each block's run)."""

    base = tmp_path_factory.mktemp("browser")
    out = base / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", *JOB, f"output_dir={out}"],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("debug")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    blocks = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return {"out": out, "client": client, "experiment": exp, "parent": parent, "blocks": blocks}


@pytest.fixture(scope="module")
def ui(job):
    """``mlflow server`` on the job's store, 127.0.0.1, one worker, in its own process group."""
    out, port = job["out"], free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}"]
    cmd += ["--default-artifact-root", str(out / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = out / "mlflow-server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the MLflow server did not answer /health in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def page(ui):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        context = browser.new_context(viewport=VIEWPORT, base_url=ui)
        # MLflow's assistant panel opens by itself on a first visit and covers a third of the page.
        context.add_init_script(
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )
        context.set_default_timeout(WAIT_MS)
        yield context.new_page()
        browser.close()


@pytest.fixture(scope="module")
def shot(tmp_path_factory):
    """``shot(page, name)``: a PNG of the page under the test's tmp dir (and $DBLOCKS_SCREENSHOTS)."""
    folder = tmp_path_factory.mktemp("screenshots")

    def take(page, name: str) -> Path:
        path = folder / name
        page.screenshot(path=path, animations="disabled")  # transitions run to their end first
        if SCREENSHOTS and name in SHOWN:
            target = ROOT / SCREENSHOTS  # an absolute path stays as it is
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / name)
        return path

    return take


def visit(page, route: str) -> None:
    """Open ``route`` of the UI as a user who picked "Model training" (not "GenAI") in its switch."""
    page.goto("about:blank")  # a fresh load: a change of the #route alone leaves some pages as they were
    page.goto(f"/#{route}?{TRAINING_VIEW}")


def run_route(job, run, tab: str = "") -> str:
    return f"/experiments/{job['experiment'].experiment_id}/runs/{run.info.run_id}" + (f"/{tab}" if tab else "")


def test_the_experiment_opens_on_its_runs_not_on_the_genai_page(job, page, shot):
    """The link to an experiment, ``#/experiments/<id>?workflowType=machine_learning``, lands on its
    runs table, not on the GenAI overview ("Traces 0"). MLflow 3.17.2's UI decides by that URL
    parameter (else the browser's last choice of its GenAI / Model training switch, GenAI at first)
    and ignores the experiment's tag; the run still sets ``mlflow.experimentKind`` to
    ``custom_model_development`` (what the UI's experiment-type selector writes, and what the MLflow
    UIs without the switch read to choose the page)."""
    exp = job["experiment"]
    visit(page, f"/experiments/{exp.experiment_id}")
    expect(page).to_have_url(re.compile(rf"#/experiments/{exp.experiment_id}/runs\b"))
    expect(page.get_by_role("columnheader", name="Run Name").first).to_be_visible()
    expect(page.get_by_role("link", name=job["parent"].info.run_name)).to_be_visible()
    expect(page.get_by_text("No data available for the selected time range")).to_have_count(0)  # GenAI's charts
    shot(page, "experiment.png")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development", exp.tags


def test_the_parent_run_has_one_child_run_per_block(job, page, shot):
    names = [f"blocks/{b}" for b in range(BLOCKS)]
    assert sorted(job["blocks"]) == names
    visit(page, f"/experiments/{job['experiment'].experiment_id}/runs")
    parent = page.get_by_role("row").filter(has=page.get_by_role("link", name=job["parent"].info.run_name))
    for name in names:  # collapsed under the parent at first
        expect(page.get_by_role("link", name=name, exact=True)).to_have_count(0)
    parent.locator("button[data-component-id*='runnamecellrenderer']").click()  # the expander beside the name
    for name in names:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    expect(page.get_by_text(f"{1 + BLOCKS} matching runs")).to_be_visible()
    shot(page, "runs.png")


def test_a_block_run_shows_its_loss_and_sigma_bucket_charts(job, page, shot):
    run = job["blocks"]["blocks/0"]
    buckets = sorted(k for k in run.data.metrics if k.startswith("loss_sigma/"))
    assert len(buckets) >= 3, sorted(run.data.metrics)  # 4 log-spaced ranges; one may stay empty in 2 units
    page.set_viewport_size({"width": 1400, "height": 1450})  # the σ charts and the loss chart below them
    try:
        visit(page, run_route(job, run, "model-metrics"))
        page.get_by_placeholder("Search metric charts").fill("loss")
        for metric in ["loss", *buckets]:  # each chart's legend: "<run name> (<metric>)"
            expect(page.get_by_text(f"blocks/0 ({metric})", exact=True)).to_be_visible()
        expect(page.get_by_text("blocks/0 (grad_norm)", exact=True)).to_have_count(0)  # filtered out
        shot(page, "block-charts.png")
    finally:
        page.set_viewport_size(VIEWPORT)


def artifact(job, page, shot, path: str, png: str) -> None:
    """Open ``path`` in the parent run's artifact browser: the file is in the tree, its preview an
    image the browser decoded."""
    visit(page, run_route(job, job["parent"], f"artifacts/{path}"))
    expect(page.get_by_text(Path(path).name, exact=True).first).to_be_visible()  # in the tree
    image = page.get_by_role("img", name=path, exact=True)  # the preview: alt is the artifact's path
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    shot(page, png)


def test_the_parent_run_shows_the_loss_vs_sigma_plot(job, page, shot):
    artifact(job, page, shot, "loss_vs_sigma.png", "loss-vs-sigma.png")


def test_the_parent_run_shows_the_final_sample_grid(job, page, shot):
    artifact(job, page, shot, "samples/blocks/samples.png", "samples.png")


def test_the_parent_run_shows_a_sample_grid_from_the_middle_of_training(job, page, shot):
    """The previews of ``eval.every=1``: ``samples/during/blocks/unit-<n>.png`` after every unit (inline
    workers take turns, so the blocks advance together); the one shown is from before the end."""
    logged = [a.path for a in job["client"].list_artifacts(job["parent"].info.run_id, "samples/during/blocks")]
    units = sorted(logged, key=lambda p: int(re.search(r"unit-(\d+)", p).group(1)))
    assert units == [f"samples/during/blocks/unit-{n}.png" for n in range(1, STEPS // UNIT + 1)], units
    artifact(job, page, shot, units[(len(units) - 1) // 2], "samples-during.png")


def test_the_registry_lists_every_block_with_its_aliases_and_description(job, page, shot):
    names = [f"debug-block{b}" for b in range(BLOCKS)]
    visit(page, "/models")
    for name in names:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    shot(page, "models.png")
    for name in names:
        visit(page, f"/models/{name}")
        for alias in ("@ candidate", "@ champion"):
            expect(page.get_by_text(alias, exact=True)).to_be_visible()
        description = job["client"].get_registered_model(name).description or ""
        for part in DESCRIPTION_HAS:
            assert part.format(name=name) in description, f"{name}'s description lacks {part!r}: {description!r}"
        expect(page.get_by_text(f"models:/{name}@champion").first).to_be_visible()  # rendered from Markdown
        shot(page, "registry.png" if name == names[0] else f"registry-{name}.png")
