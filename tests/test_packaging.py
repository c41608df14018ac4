"""The framework as a lab installs it: a wheel that carries its configs, run from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import REPO, TINY

ENTRY_POINTS = {  # console script: module (python -m)
    "glint-train": "glint_lightning.train",
    "glint-eval": "glint_lightning.eval",
    "glint-predict": "glint_lightning.predict",
    "glint-export": "glint_lightning.export",
    "glint-report": "glint_lightning.report",
    "glint-cv": "glint_lightning.cv",
    "glint-ckpt-info": "glint_lightning.ckpt_info",
    "glint-check": "glint_lightning.data.check",
    "glint-convert": "glint_lightning.data.convert",
    "glint-make-demo": "glint_lightning.data.make_demo",
}
OPTIONS = {  # options each --help must name
    "glint-train": ["glint-train", "ckpt_path", "optimized_metric", "model:"],
    "glint-eval": ["glint-eval", "ckpt_path", "split", "threshold"],
    "glint-predict": ["glint-predict", "ckpt_path", "input", "output", "mode"],
    "glint-export": ["glint-export", "ckpt_path", "format"],
    "glint-report": ["glint-report", "dir"],
    "glint-cv": ["glint-cv", "dir", "optimized_metric", "tta"],
    "glint-ckpt-info": ["--json"],
    "glint-check": ["path"],
    "glint-convert": ["glint-convert", "src", "tile", "stride"],
    "glint-make-demo": ["glint-make-demo", "out", "n_train"],
}


@pytest.fixture(scope="module")
def installed(installed_wheel: Path) -> Path:
    """The session's wheel, installed into a folder of its own (conftest's installed_wheel)."""
    return installed_wheel


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """`<script> --help` for every console script, a few at a time (each is a process of its own, mostly imports);
    with what each left behind in its empty working folder."""

    def answer(script: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        cwd = tmp_path_factory.mktemp(script)
        exe = Path(sys.executable).parent / script
        res = subprocess.run([str(exe), "--help"], cwd=cwd, capture_output=True, text=True, timeout=300)
        return res, sorted(p.name for p in cwd.iterdir())

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(ENTRY_POINTS, pool.map(answer, ENTRY_POINTS)))


def _run(site: Path, args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "GLINT_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_wheel_carries_the_repos_configs(installed):
    packaged = sorted(p.relative_to(installed / "glint_lightning" / "conf") for p in installed.rglob("conf/**/*.yaml"))
    assert packaged == sorted(p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml"))
    assert not (REPO / "glint_lightning" / "conf").exists(), "one source of truth: the repo's conf/ only"
    assert (installed / "hydra_plugins" / "glint_optuna_sweeper.py").is_file(), "the Optuna sweeper plugin ships"
    scripts = (installed / "glint_lightning-0.1.0.dist-info" / "entry_points.txt").read_text()
    for name, module in ENTRY_POINTS.items():
        assert f"{name} = {module}:main" in scripts


@pytest.mark.slow
def test_installed_package_works_from_an_empty_folder(installed, tmp_path, cache_dir):
    """What a lab does after `pip install`: train (debug=default), eval, predict and export, outside the checkout.
    Commands that do not need each other's files run side by side (each is mostly its imports)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return _run(installed, [sys.executable, *args], tmp_path, cache_dir)

    def glint(module: str, *args: str) -> subprocess.CompletedProcess:
        res = run("-m", f"glint_lightning.{module}", *args)
        assert res.returncode == 0, f"{module}: {res.stderr[-3000:]}"
        return res

    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = np.full((1, 40, 56), 1000.0, np.float32)
    with ThreadPoolExecutor(max_workers=3) as pool:
        where = pool.submit(run, "-c", "import glint_lightning; print(glint_lightning.__file__)")
        job = pool.submit(glint, "train", "--cfg", "job")
        trained = pool.submit(glint, "train", "debug=default", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run")
        assert where.result().stdout.strip().startswith(str(installed)), "not the checkout"
        assert "_target_: glint_lightning.models.UNet" in job.result().stdout
        ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
        assert "best checkpoint:" in trained.result().stdout and ckpt.is_file()
        scored = pool.submit(glint, "eval", f"ckpt_path={ckpt}", "split=val", "out=eval")
        predicted = pool.submit(glint, "predict", f"ckpt_path={ckpt}", "input=frames.h5", "output=masks.h5")
        exported = pool.submit(glint, "export", f"ckpt_path={ckpt}", "format=torchscript", "out=model.pt")
        assert "scored:" in scored.result().stdout
        predicted.result()
        assert "max abs diff" in exported.result().stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "frames.h5", "masks.h5", "model.pt", "run"]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_every_entry_point_answers_help(script, helps):
    """Each console script (installed by `make`): --help exits 0 and names options (the `python -m` twins are
    tested in test_tool_clis and test_cli)."""
    res, left = helps[script]
    assert res.returncode == 0, res.stderr[-2000:]
    missing = [name for name in OPTIONS[script] if name not in res.stdout]
    assert not missing, f"{script} --help does not name {missing}:\n{res.stdout}"
    assert left == [], "--help leaves nothing behind"
