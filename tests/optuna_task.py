"""A tiny Hydra app for sweeper tests (no training): `python -m tests.optuna_task --config-dir <dir> ...`.

Its config (written by the test) sets `x` (the swept value), `out` (a folder) and optionally `fail_above`. Job n
records its start in `<out>/started_<n>_<pid>`, waits while `<out>/hold_<n>` exists, and returns x (raises when x
is above fail_above), so a test can kill a sweep mid-trial or hold two launches' trials at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
import optuna
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from glint_lightning.utils.config_dir import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent


@hydra.main(version_base="1.3", config_path=None, config_name="task")
def main(cfg: DictConfig) -> float:
    out, job = Path(cfg.out), HydraConfig.get().job.num
    (out / f"started_{job}_{os.getpid()}").write_text(str(cfg.x))
    end = time.monotonic() + 120
    while (out / f"hold_{job}").exists() and time.monotonic() < end:
        time.sleep(0.05)
    if cfg.get("fail_above") is not None and cfg.x > cfg.fail_above:
        raise ValueError(f"x={cfg.x} is above {cfg.fail_above}")
    return float(cfg.x)


class TaskSweep:
    """`python -m tests.optuna_task -m` over x in [0, 1], its study in <tmp>/study.db, its jobs' traces in <tmp>/out."""

    def __init__(self, tmp_path: Path, n_trials: int, **task: object) -> None:
        self.root, self.out, self.db = tmp_path, tmp_path / "out", tmp_path / "study.db"
        self.out.mkdir(exist_ok=True)
        config = {
            "defaults": [{"override hydra/sweeper": "glint_optuna"}, "_self_"],
            "x": 0.0,
            "out": str(self.out),
            "fail_above": task.get("fail_above"),
            "hydra": {
                "searchpath": [f"file://{CONFIG_DIR}"],
                "sweep": {"dir": str(tmp_path / "multirun" / "${now:%H-%M-%S-%f}")},
                "sweeper": {"storage": str(self.db), "n_trials": n_trials, "sampler": {"seed": 0}},
            },
        }
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def popen(self, *overrides: str) -> subprocess.Popen:
        args = ["--config-dir", str(self.root), "-m", "hydra.sweeper.params={x: 'interval(0, 1)'}", *overrides]
        return subprocess.Popen(
            [sys.executable, "-m", "tests.optuna_task", *args],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run(self, *overrides: str) -> str:
        proc = self.popen(*overrides)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
        return out

    def started(self, job: int) -> list[Path]:
        return list(self.out.glob(f"started_{job}_*"))

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="glint", storage=f"sqlite:///{self.db}").trials


if __name__ == "__main__":
    main()
