"""What pruning saves: the same seeded Optuna sweep (`hparams_search=optuna`, TPE seeded, the demo set) run twice,
without a pruner and with the median pruner, printing the epochs trained over all trials and the best score of each.
Goal: at least 35 % fewer epochs with the median pruner, for a best score within 0.01 of the unpruned sweep's.

    python -m benchmarks.pruning [--trials 12] [--epochs 8] [--tiny] [--pruner-args "{n_startup_trials: 4}"]
        [--keep DIR] [override ...]

The full run trains the quickstart (experiment=quickstart, 1024 tiles of 64 px) for --epochs epochs per trial:
2 x 12 trainings, long on a CPU. --tiny trains a 4-channel U-Net on 48 tiles of 32 px instead: it checks the
machinery in minutes, but its scores are noise, not the figure to quote. Both variants run in one process tree,
one after the other, each with its own study (outputs under a temporary folder, or --keep DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

TINY = [
    "model.base_channels=4",
    "model.depth=2",
    "data.batch_size=8",
    "data.demo.n_train=48",
    "data.demo.n_val=16",
    "data.demo.n_test=16",
    "data.demo.tile=32",
    "hydra.sweeper.params={optimizer.lr: 'tag(log, interval(1e-4, 1e-1))', loss.weights.dice: 'interval(0.25, 2.0)'}",
]


def sweep(root: Path, pruner: str, args: argparse.Namespace) -> dict[str, float]:
    """One sweep into root/<pruner>: epochs trained over all trials, the best score, trials pruned, wall time."""
    out = root / pruner
    overrides = [
        "hparams_search=optuna",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.pruner={pruner}",
        f"paths.outputs_root={out}",
        "seed=0",
        "test=false",
        f"trainer.max_epochs={args.epochs}",
    ]
    if pruner != "none" and args.pruner_args:
        overrides.append(f"hydra.sweeper.pruner_args={args.pruner_args}")
    if args.tiny:
        overrides += TINY
    else:  # the quickstart's cosine schedule spans the run: scale it with the epochs
        overrides += ["experiment=quickstart", f"scheduler.scheduler.T_max={args.epochs * 1024 // 8 - 20}"]
    started = time.monotonic()
    cmd = [sys.executable, "-m", "glint_lightning.train", *overrides, *args.overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    study = optuna.load_study(study_name="glint", storage=f"sqlite:///{out}/optuna/glint.db")
    epochs = 0
    for trial in study.trials:
        job = Path(trial.user_attrs["hydra_sweep_dir"]) / str(trial.user_attrs["hydra_job_num"])
        epochs += json.loads((job / "metrics.json").read_text())["epochs"]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return {"epochs": epochs, "best": study.best_value, "pruned": pruned, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on 32 px tiles (checks the machinery)")
    parser.add_argument("--pruner-args", default="", help='e.g. "{n_startup_trials: 4, n_warmup_steps: 1}"')
    parser.add_argument("--keep", type=Path, help="keep both sweeps' outputs in this folder")
    parser.add_argument("overrides", nargs="*", help="more train overrides for both sweeps")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        results = {pruner: sweep(root, pruner, args) for pruner in ("none", "median")}
    base, pruned = results["none"], results["median"]
    kind = "tiny model, 32 px (machinery check)" if args.tiny else "quickstart, 64 px"
    load = os.getloadavg()[0]
    print(f"{args.trials} trials x up to {args.epochs} epochs, TPE seed 0, {kind}; load average {load:.1f}")
    print(f"{'pruner':8} {'epochs':>7} {'pruned':>7} {'best val/iou':>13} {'wall s':>8}")
    for name, r in results.items():
        print(f"{name:8} {r['epochs']:7d} {r['pruned']:7d} {r['best']:13.4f} {r['seconds']:8.0f}")
    saved = 1 - pruned["epochs"] / base["epochs"]
    gap = base["best"] - pruned["best"]
    print(f"epochs saved: {saved:.0%} (goal >= 35%); best score: {gap:+.4f} below the unpruned sweep's (goal <= 0.01)")


if __name__ == "__main__":
    main()
