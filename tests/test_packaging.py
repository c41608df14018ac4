"""The framework as a lab installs it: a wheel that carries its configs, run from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
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
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` then `pip install --no-deps --target`: the package as a user gets it, not the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(REPO)], check=True)
    (wheel,) = tmp.glob("glint_lightning-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True)
    return tmp / "site"


def _run(site: Path, args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "GLINT_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


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
    """What a lab does after `pip install`: train (debug=default), eval, predict and export, outside the checkout."""
    py = [sys.executable, "-c", "import glint_lightning; print(glint_lightning.__file__)"]
    assert _run(installed, py, tmp_path, cache_dir).stdout.strip().startswith(str(installed)), "not the checkout"
    job = _run(installed, [sys.executable, "-m", "glint_lightning.train", "--cfg", "job"], tmp_path, cache_dir)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "_target_: glint_lightning.models.UNet" in job.stdout

    def glint(module: str, *args: str) -> subprocess.CompletedProcess:
        res = _run(installed, [sys.executable, "-m", f"glint_lightning.{module}", *args], tmp_path, cache_dir)
        assert res.returncode == 0, f"{module}: {res.stderr[-3000:]}"
        return res

    res = glint("train", "debug=default", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "best checkpoint:" in res.stdout
    assert "scored:" in glint("eval", f"ckpt_path={ckpt}", "split=val", "out=eval").stdout
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = np.full((1, 40, 56), 1000.0, np.float32)
    glint("predict", f"ckpt_path={ckpt}", "input=frames.h5", "output=masks.h5")
    assert "max abs diff" in glint("export", f"ckpt_path={ckpt}", "format=torchscript", "out=model.pt").stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "frames.h5", "masks.h5", "model.pt", "run"]


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_every_entry_point_answers_help(script, tmp_path, cache_dir):
    """Each console script (installed by `make`): --help exits 0 and names options (the `python -m` twins are
    tested in test_tool_clis and test_cli)."""
    exe = Path(sys.executable).parent / script
    for args in ([str(exe), "--help"],):
        res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        missing = [name for name in OPTIONS[script] if name not in res.stdout]
        assert not missing, f"{args}: --help does not name {missing}:\n{res.stdout}"
    assert list(tmp_path.iterdir()) == [], "--help leaves nothing behind"
