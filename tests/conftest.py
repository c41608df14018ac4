"""Shared fixtures: a tiny demo data set, Hydra-composed configs for tiny CPU runs, one trained run (with a test
split) shared by the session, the library's log lines. Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import EXACT, REPO, TINY, TINY_MODEL


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly (with the reason) on machines without CUDA. Under pytest-xdist
    (`--dist loadgroup`, as `make test` runs) the SLURM tests share one worker, so one local cluster serves them."""
    for item in items:
        if item.path.name == "test_slurm.py":
            item.add_marker(pytest.mark.xdist_group("slurm"))
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo-data cache for the whole session (generated on first use, keyed by its parameters)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["GLINT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """compose(train.yaml) with TINY + overrides; the run dir is tmp_path/<run> and outputs_root is tmp_path."""

    def _make(*overrides: str, run: str = "run") -> DictConfig:
        model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "unet")
        tiny = [o for o in TINY if not o.startswith("model.")] + TINY_MODEL[model]
        if "data=h5" in overrides:  # your own files: no demo block
            tiny = [o for o in tiny if not o.startswith("data.demo.")]
        fixed = [
            f"paths.output_dir={tmp_path / run}",
            f"paths.outputs_root={tmp_path}",
            f"paths.cache_dir={cache_dir}",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=[*tiny, *fixed, *overrides])

    return _make


def train_once(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, name: str, *overrides: str) -> Path:
    """Train TINY + overrides into a fresh session-wide run dir (outputs_root is that dir too); return the run dir.
    For session fixtures: each training a session shares is paid for once."""
    from glint_lightning.train import train

    run = tmp_path_factory.mktemp(name)
    fixed = [f"paths.output_dir={run}", f"paths.outputs_root={run}", f"paths.cache_dir={cache_dir}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *fixed, *overrides])
    train(cfg)
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One tiny U-Net run shared by the whole session: TINY on the demo data (48 train / 16 val / 16 test tiles of
    32 px, batches of 8), one epoch (global step 6), threshold calibrated, the best checkpoint scored on the test
    split. Its run dir holds checkpoints/{last,best-epoch000}.ckpt, metrics.json (with "test"), data.json,
    provenance.json, tensorboard/ and csv/metrics.csv. Read it; write your own outputs elsewhere (tmp_path)."""
    return train_once(tmp_path_factory, cache_dir, "trained", "trainer.max_epochs=1", "logger=[tensorboard,csv]")


@pytest.fixture(scope="session")
def trained_ckpt(trained_run: Path) -> Path:
    """The shared run's last.ckpt (one epoch, global step 6)."""
    return trained_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def exact_straight(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The weights after TINY + EXACT trained straight through its 2 epochs (12 steps): what every resumed run
    (after a signal, a crash or a stop at an epoch's end) must reproduce."""
    run = train_once(tmp_path_factory, cache_dir, "straight", *EXACT)
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as a user gets it, built once a session: `pip wheel .` then `pip install --no-deps --target`;
    returns that site folder (put it on PYTHONPATH to run the installed package instead of the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(REPO)], check=True)
    (wheel,) = tmp.glob("glint_lightning-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True)
    return tmp / "site"


@pytest.fixture
def glint_log(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """The library's log lines (resuming, schedules, pretrained weights, locks) since the last call."""
    caplog.set_level(logging.INFO, logger="glint_lightning")

    def read() -> str:
        text = caplog.text
        caplog.clear()
        return text

    return read


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple]:
    """Run a console script's `main()` in this process as its command line `args` from folder `cwd`; return
    (exit code, stdout, stderr). It spares the 3-5 s of imports a subprocess pays where the process boundary is not
    what a test is about (each script keeps a subprocess test elsewhere). Hydra's logging set-up is undone after."""

    def run(main: Callable[[], object], *args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple:
        monkeypatch.chdir(cwd)
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", [main.__module__, *args])
        loggers = [
            logging.getLogger(),
            *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
        ]
        saved = {lg: (lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers}
        code: object = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
        finally:
            for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
                if not isinstance(lg, logging.Logger):
                    continue
                handlers, level, propagate, disabled = saved.get(lg, ([], logging.NOTSET, True, False))
                for handler in lg.handlers:
                    if handler not in handlers:
                        handler.close()
                lg.handlers[:], lg.propagate, lg.disabled = handlers, propagate, disabled
                lg.setLevel(level)
        out, err = capsys.readouterr()
        return code, out, err

    return run
