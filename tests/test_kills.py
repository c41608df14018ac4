"""SIGKILL at random moments, and in the middle of checkpoint saves, never costs more than the last step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glint_lightning.checkpoints.reader import load_checkpoint
from tests.helpers import REPO, TINY

EPOCHS, STEPS_PER_EPOCH = 8, 6  # 48 demo tiles in batches of 8
RUN = [
    *TINY,
    f"trainer.max_epochs={EPOCHS}",
    "test=false",
    "callbacks.step_checkpoint.every_n_train_steps=1",
    "hydra.run.dir=outputs/run",
]


def _start(module: str, cwd: Path, env: dict, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", module, *RUN, *(["ckpt_path=last"] if resume else [])]
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen(
        args,
        cwd=cwd,
        env={**os.environ, **env, "PYTHONPATH": pythonpath},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll every millisecond until `condition()` holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("training made no progress within the timeout")


def _temporaries(ckpts: Path) -> list[str]:
    return [p.name for p in ckpts.glob(".*.tmp-*")]


def _global_step(path: Path) -> int:
    return int(load_checkpoint(path)["global_step"])


@pytest.mark.slow
def test_training_resumes_to_the_end_after_repeated_sigkills(tmp_path, cache_dir):
    seed = int.from_bytes(os.urandom(4), "little")
    rng, env = random.Random(seed), {"GLINT_CACHE_DIR": str(cache_dir)}
    ckpts = tmp_path / "outputs/run/checkpoints"
    last, steps, mid_save_kills = ckpts / "last.ckpt", [0], 0
    for kill in range(4):  # two kills at random moments, two in the middle of a save
        aim_at_save = kill % 2 == 1
        proc = _start("tests.slow_saves" if aim_at_save else "glint_lightning.train", tmp_path, env, last.exists())
        before = _mtime(last)
        if not _wait_for(lambda before=before: _mtime(last) > before, proc):  # a new step is on disk
            pytest.fail(f"seed {seed}: run {kill} ended before being killed: {proc.stderr.read()[-2000:]}")
        if aim_at_save:
            if not _wait_for(lambda: bool(_temporaries(ckpts)), proc):
                pytest.fail(f"seed {seed}: run {kill} ended before its next save")
        else:
            time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if aim_at_save:
            assert _temporaries(ckpts), f"seed {seed}: kill {kill} landed in the middle of a save"
            mid_save_kills += 1
        for ckpt in ckpts.glob("*.ckpt"):  # every checkpoint on disk loads, the newest one never goes back
            load_checkpoint(ckpt)
        steps.append(_global_step(last))
        assert steps[-1] >= steps[-2], f"seed {seed}: last.ckpt went back: steps {steps}"
    assert steps[-1] < EPOCHS * STEPS_PER_EPOCH, f"seed {seed}: the kills came too late to test anything"
    assert mid_save_kills == 2

    proc = _start("glint_lightning.train", tmp_path, env, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "outputs/run/metrics.json").read_text())
    assert (summary["epochs"], summary["global_step"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH)
    assert not _temporaries(ckpts), "temporary files of killed writers are cleaned up"
    for ckpt in ckpts.glob("*.ckpt"):
        load_checkpoint(ckpt)
