"""Regenerate every figure of the documentation from real runs on this machine (`make docs-figures`).

Nothing is drawn by hand: each figure is what a command of the package wrote, copied into docs/images/, and
docs/images/figures.json records for each the command that made it, the machine, the date and how long it took.
The docs' hook (docs/hooks/glint_docs.py) writes each figure's caption from that record, so a caption always
names the run that drew its picture. The runs go into outputs/docs-figures/ (ignored by git); `--reuse` keeps
runs that finished there before and only redraws what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
WORK = REPO / "outputs" / "docs-figures"

# Small enough to train in minutes on 2 CPU cores; the figures show what each command writes, not what a long
# training reaches.
SWEEP = [
    "experiment=quickstart", "data.demo.n_train=256", "trainer.max_epochs=2", "scheduler.scheduler.T_max=44",
    "test=false",
]  # fmt: skip
CV = [
    "experiment=cv", "model.base_channels=4", "model.depth=2", "data.demo.n_train=384", "data.demo.n_test=128",
    "data.demo.tile=32", "trainer.max_epochs=4",
]  # fmt: skip


def machine() -> str:
    """One line naming the hardware the figures were measured on (GPU when there is one)."""
    cores = os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:  # pragma: no cover - torch is a dependency
        gpu = "no GPU"
    return f"{platform.machine()} Linux, {cores} CPU cores, {gpu}{load}"


def command(module: str, *args: str, log: Path) -> tuple[str, float, str]:
    """Run `python -m glint_lightning.<module> args` here; return the user-facing command, seconds and stdout."""
    argv = [sys.executable, "-m", f"glint_lightning.{module}", *args]
    shown = f"glint-{module.split('.')[-1].replace('_', '-')} " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"error: {shown} failed (exit {done.returncode}); its output is in {log}")
    return shown, seconds, done.stdout


def best_checkpoint(run: Path) -> Path:
    """The best-epochNNN.ckpt train wrote (metrics.json names it)."""
    return Path(json.loads((run / "metrics.json").read_text())["best_checkpoint"])


def tensorboard_grid(run: Path, out: Path) -> None:
    """The last depth / target / prediction grid the run logged to TensorBoard, as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES as TB_IMAGES
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = []
    if (run / "tensorboard").is_dir():
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={TB_IMAGES: 0})
        events.Reload()
        images = [im for tag in events.Tags()[TB_IMAGES] if tag == "val/predictions" for im in events.Images(tag)]
    if not images:
        sys.exit(f"error: {run}/tensorboard holds no val/predictions image; is callbacks.prediction_images on?")
    out.write_bytes(images[-1].encoded_image_string)


def demo_frames(path: Path, n: int = 2, seed: int = 7) -> None:
    """Frames of 256x384 laid out from 4x6 tiles of the demo generator (64 px, its glint sizes and density).

    One 384 px tile of the generator would hold its 1-4 glints of 2-12 px in a frame 36 times a tile's area; the
    mosaic keeps the density the model was trained on (its tile borders are depth steps, like occlusion edges).
    """
    from glint_lightning.data.demo import synth_tile

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        rows = [np.hstack([synth_tile(rng, 64, glint_free=False)[0] for _ in range(6)]) for _ in range(4)]
        frames.append(np.vstack(rows))
    with h5py.File(path, "w") as f:
        f["frames"] = np.stack(frames).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep runs finished in outputs/docs-figures/ before")
    parser.add_argument("--machine", help="how to name this machine in captions (default: cores, GPU and load)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two torch threads on a busy 2-core machine wait for each other
    if not args.reuse and WORK.exists():
        shutil.rmtree(WORK)
    IMAGES.mkdir(parents=True, exist_ok=True)
    record_file = IMAGES / "figures.json"
    records = json.loads(record_file.read_text()) if args.reuse and record_file.exists() else {}
    host = args.machine or machine()
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")

    def record(name: str, cmd: str, seconds: float, what: str) -> None:
        records[name] = {"command": cmd, "seconds": round(seconds), "machine": host, "date": today, "what": what}
        record_file.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")

    logs = WORK / "logs"
    run = WORK / "quickstart"
    if not (args.reuse and (run / "metrics.json").exists()):
        cmd, s, _ = command("train", "experiment=quickstart", f"hydra.run.dir={run}", log=logs / "train.txt")
        record("train", cmd.replace(str(REPO) + "/", ""), s, "the quickstart run every other figure comes from")
    best = best_checkpoint(run)
    train_cmd = records.get("train", {}).get("command", "glint-train experiment=quickstart")

    tensorboard_grid(run, IMAGES / "tensorboard_grid.png")
    record(
        "tensorboard_grid",
        train_cmd,
        records.get("train", {}).get("seconds", 0),
        "TensorBoard's val/predictions grid at the last epoch: depth, true glints, predicted probability (rows)",
    )

    cmd, s, _ = command("eval", f"ckpt_path={best}", "split=test", log=logs / "eval.txt")
    shutil.copy(run / "eval" / f"{best.stem}-test" / "pr_curve.png", IMAGES / "pr_curve.png")
    record(
        "pr_curve",
        cmd.replace(str(REPO) + "/", ""),
        s,
        "the PR curve glint-eval wrote (pr_curve.png) for the quickstart's best checkpoint on the demo test split",
    )

    frames, overlays = WORK / "frames.h5", WORK / "overlays"
    demo_frames(frames)
    predict_args = [f"ckpt_path={best}", f"input={frames}", f"output={WORK / 'masks.h5'}", f"overlays={overlays}"]
    cmd, s, _ = command("predict", *predict_args, "overwrite=true", log=logs / "predict.txt")
    first = sorted(overlays.glob("*_overlay.png"))[0]
    shutil.copy(first, IMAGES / "predict_overlay.png")
    what = f"the overlay glint-predict wrote ({first.name}): a 256x384 frame laid out from 24 demo tiles"
    record("predict_overlay", cmd.replace(str(REPO) + "/", ""), s, what)

    sweep = WORK / "sweep"
    if not (args.reuse and (sweep / "report.png").exists()):
        cmd, s, _ = command(
            "train", "-m", "loss=focal,bce,dice", *SWEEP, f"hydra.sweep.dir={sweep}", log=logs / "sw.txt"
        )
        record("sweep", cmd.replace(str(REPO) + "/", ""), s, "a 3-job loss sweep")
    cmd, s, _ = command("report", f"dir={sweep}", log=logs / "report.txt")
    shutil.copy(sweep / "report.png", IMAGES / "sweep_report.png")
    record(
        "sweep_report",
        cmd.replace(str(REPO) + "/", ""),
        s,
        "the chart glint-report wrote (report.png) for a sweep of three losses",
    )

    cv = WORK / "cv"
    if not (args.reuse and (cv / "cv.json").exists()):
        cmd, s, _ = command("train", "-m", *CV, f"hydra.sweep.dir={cv}", log=logs / "cv-train.txt")
        record("cv_train", cmd.replace(str(REPO) + "/", ""), s, "3 fold runs")
    cmd, s, out = command("cv", f"dir={cv}", log=logs / "cv.txt")
    table = out[out.index("cross-validation:") :].replace(str(REPO) + "/", "")
    (IMAGES / "cv_table.txt").write_text(table)
    record("cv_table", cmd.replace(str(REPO) + "/", ""), s, "the table glint-cv prints")
    print(f"wrote {len(list(IMAGES.glob('*.png')))} figures and cv_table.txt into {IMAGES}; captions in {record_file}")


if __name__ == "__main__":
    main()
