"""What test-time augmentation buys and costs: glint-eval's scores (pixel IoU and F1, glint-level F1 on the demo
test split) and its time for tta=none, flip (4 passes) and d4 (8 passes) on one checkpoint, through the real
eval entry point (conf/eval.yaml composed with Hydra, glint_lightning.eval.evaluate), each timed call in turn.

    python -m benchmarks.tta [--ckpt FILE | --run-dir DIR] [--rounds 3] [--split test] [--threads N]

Without --ckpt or --run-dir it first trains the quickstart (experiment=quickstart, as `make train`; about a
minute on 2 CPU cores) into a temporary folder and scores its best checkpoint; --run-dir takes the best checkpoint
of an earlier run (e.g. a `make train` run dir). The threshold is the checkpoint's calibrated one (chosen
without TTA). Seconds are the median over the rounds of one evaluate() call (loading the checkpoint and the split,
scoring, writing the reports; not the interpreter's start-up), the ratio to tta=none is taken per round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from benchmarks.common import Stopwatch
from glint_lightning.eval import evaluate
from glint_lightning.utils.config_dir import CONFIG_DIR

TTAS = ("none", "flip", "d4")


def best_checkpoint(run_dir: Path) -> Path:
    """The run's best checkpoint (best-epochNNN.ckpt), else its last.ckpt."""
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt")) or sorted((run_dir / "checkpoints").glob("last.ckpt"))
    if not found:
        raise SystemExit(f"{run_dir}: no checkpoints/best-*.ckpt or last.ckpt; pass a run dir of glint-train")
    return found[-1]


def train_quickstart(run_dir: Path) -> Path:
    """`make train`'s run (without its test at the end) into run_dir; its best checkpoint."""
    cmd = [
        sys.executable,
        "-m",
        "glint_lightning.train",
        "experiment=quickstart",
        f"hydra.run.dir={run_dir}",
        "test=false",
    ]
    print(f"training the quickstart for the checkpoint: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return best_checkpoint(run_dir)


def score(ckpt: Path, tta: str, split: str, out: Path, device: str) -> tuple[dict, float]:
    """glint-eval ckpt_path=<ckpt> tta=<tta> split=<split>: (its result, seconds of the evaluate() call)."""
    overrides = [f"ckpt_path={ckpt}", f"tta={tta}", f"split={split}", f"out={out}", f"device={device}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    with Stopwatch() as watch:
        result = evaluate(cfg)
    return result, watch.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--ckpt", type=Path, help="the checkpoint to score")
    given.add_argument("--run-dir", type=Path, help="score this glint-train run dir's best checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (the eval option)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-tta-", dir="outputs" if Path("outputs").is_dir() else None))
    try:
        if args.ckpt:
            ckpt = args.ckpt
        elif args.run_dir:
            ckpt = best_checkpoint(args.run_dir)
        else:
            ckpt = train_quickstart(work / "run")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        score(ckpt, "none", args.split, work / "warm-up", args.device)  # lazy imports, file caches
        results: dict[str, dict] = {}
        seconds: dict[str, list[float]] = {tta: [] for tta in TTAS}
        for r in range(args.rounds):
            for tta in TTAS[r % len(TTAS) :] + TTAS[: r % len(TTAS)]:
                results[tta], s = score(ckpt, tta, args.split, work / f"eval-{tta}", args.device)
                seconds[tta].append(s)
        split, none = args.split, results["none"]
        print(
            f"tta on {none['scored']}: {ckpt}, threshold {none['threshold']:.2f} (calibrated without TTA), "
            f"device={args.device}, {torch.get_num_threads()} threads, median of {args.rounds} rounds; "
            f"load average {load} at the start, " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " at the end"
        )
        header = ("tta", "IoU", "F1", "glint F1", "seconds", "x none", "IoU gain", "F1 gain")
        print("  {:5s} {:>7s} {:>7s} {:>8s} {:>8s} {:>7s} {:>9s} {:>8s}".format(*header))
        for tta in TTAS:
            res = results[tta]
            iou, f1, obj = res[f"{split}/iou"], res[f"{split}/f1"], res.get(f"{split}/object_f1", float("nan"))
            ratio = statistics.median(s / b for s, b in zip(seconds[tta], seconds["none"]))
            print(
                f"  {tta:5s} {iou:7.4f} {f1:7.4f} {obj:8.4f} {statistics.median(seconds[tta]):8.2f} {ratio:6.2f}x "
                f"{iou - none[f'{split}/iou']:+9.4f} {f1 - none[f'{split}/f1']:+8.4f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
