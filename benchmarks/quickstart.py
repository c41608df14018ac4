"""Time to first result: `make train` (python -m glint_lightning.train experiment=quickstart) in a subprocess,
timed from process start to exit, with its final validation IoU read from the run's metrics.json, against the
target (val/iou >= 0.70 within 60 s on 2 CPU cores). Also the start-up costs on their own (importing the
package, generating the demo set) and, per epoch, when its line was logged (train.log) and its val/iou.

    python -m benchmarks.quickstart [--repeats 1] [--cold] [--previous] [--compare "k=v ..."] [--threads N]
        [--keep DIR] [override ...]

--cold generates the demo set into a fresh cache folder inside the timed run (what the first `make train`
after the install does); otherwise the cached set under outputs/cache is used (generated first if missing,
outside the timing). --previous also runs the quickstart as it was before it was tuned (the overrides in
PREVIOUS) and --compare "k=v ..." any other variant; the variants run alternately, so a load change on the
machine hits them alike, and the fastest of --repeats is printed for each, with the least CPU time (user +
system) and both as ratios to the quickstart's. The load average is printed with the figures: on a shared machine
wall time grows with it, and torch's two threads on two busy cores can be several times slower than one (they
wait for each other); --threads 1 then gives steadier CPU-time ratios between variants.

--keep DIR keeps each variant's last run dir (DIR/quickstart, DIR/previous, ...), e.g. for benchmarks.tta.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TARGET_S, TARGET_IOU = 60.0, 0.70
# The quickstart before it was tuned for time: 6 epochs over 2048 tiles in batches of 32, fp32 NCHW, cosine per
# epoch at lr 1e-3, a 2-batch sanity check; 80-129 s to val/iou 0.706 on the 2-core machine.
PREVIOUS = (
    "data.demo.n_train=2048 data.batch_size=32 trainer.max_epochs=6 channels_last=false optimizer.lr=1e-3 "
    "scheduler.interval=epoch scheduler.scheduler.T_max=6 scheduler.warmup_epochs=0 trainer.num_sanity_val_steps=2"
)
EPOCH_LINE = re.compile(  # train.log: [2026-11-24 17:24:39,591][glint_lightning.progress][INFO] - epoch 3/6 ...
    r"^\[(?P<time>[\d\- :,]+)\]\[glint_lightning\.progress\].* - epoch (?P<epoch>\d+)/\d+(?P<rest>.*)"
)


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cpu_seconds() -> float:
    """User + system CPU seconds of the waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """(wall clock at start, seconds to exit, CPU seconds, result) of a command."""
    start_wall, start, cpu = time.time(), time.perf_counter(), cpu_seconds()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return start_wall, time.perf_counter() - start, cpu_seconds() - cpu, result


def import_seconds(env: dict[str, str]) -> float:
    """Seconds for a fresh interpreter to import the training entry point (torch, Lightning, Hydra, ...)."""
    return timed([sys.executable, "-c", "import glint_lightning.train"], env)[1]


def generate(env: dict[str, str], cache: Path, overrides: list[str]) -> float:
    """Seconds to generate the demo set of the quickstart (with `overrides`) into `cache` (0 when it is there)."""
    gen = (
        "import sys\nfrom hydra import compose, initialize_config_dir\n"
        "from glint_lightning.data.demo import cached_demo\nfrom glint_lightning.utils.config_dir import CONFIG_DIR\n"
        "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=quickstart', *sys.argv[2:]])\n"
        "import time; t = time.perf_counter()\n"
        "cached_demo(**{**cfg.data.demo, 'cache_dir': sys.argv[1]}); print(time.perf_counter() - t)\n"
    )
    *_, result = timed([sys.executable, "-c", gen, str(cache), *overrides], env)
    if result.returncode:
        raise SystemExit(f"demo generation failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.split()[-1])


def epochs(log: Path, start_wall: float) -> list[tuple[int, float, float | None]]:
    """(epoch, seconds from process start to its line in train.log, val/iou or None) per epoch."""
    found = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        m = EPOCH_LINE.match(line)
        if m:
            at = datetime.strptime(m["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp() - start_wall
            iou = re.search(r"val/iou=([\d.]+)", m["rest"])
            found.append((int(m["epoch"]), at, float(iou[1]) if iou else None))
    return found


def run(overrides: list[str], run_dir: Path, cache: Path, env: dict[str, str]) -> dict:
    """One `make train`: wall seconds to exit, final and best val/iou, test/iou, per-epoch times."""
    cmd = [
        sys.executable,
        "-m",
        "glint_lightning.train",
        "experiment=quickstart",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}",
        *overrides,
    ]
    start_wall, seconds, cpu, result = timed(cmd, env)
    if result.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    per_epoch = epochs(run_dir / "train.log", start_wall)
    reached = next((at for _, at, iou in per_epoch if iou is not None and iou >= TARGET_IOU), None)
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "val_iou": metrics["final"].get("val/iou"),
        "best_val_iou": metrics.get("best_score"),
        "test_iou": metrics.get("test", {}).get("test/iou"),
        "train_s": metrics.get("duration_s"),
        "reached_s": reached,
        "epochs": per_epoch,
        "load": load(),
    }


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra overrides for the quickstart run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant; the best (fastest) is shown")
    parser.add_argument("--cold", action="store_true", help="generate the demo set inside each timed run")
    parser.add_argument("--previous", action="store_true", help="also run the quickstart as it was before tuning")
    parser.add_argument("--compare", action="append", default=[], help='another variant: "k=v k=v" (repeatable)')
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    parser.add_argument("--keep", type=Path, help="keep the (last) run dir of each variant under this folder")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill: stop the running training, remove the folder

    env = child_env(args.threads)
    variants = {"quickstart": args.overrides}
    if args.previous:
        variants["previous"] = shlex.split(PREVIOUS) + args.overrides
    for i, extra in enumerate(args.compare):
        variants[f"variant {i + 1}"] = shlex.split(extra) + args.overrides
    work = Path(tempfile.mkdtemp(prefix="bench-quickstart-", dir="outputs" if Path("outputs").is_dir() else None))
    warm_cache = Path(os.environ.get("GLINT_CACHE_DIR", "outputs/cache"))
    print(f"quickstart: time to val/iou >= {TARGET_IOU} (target {TARGET_S:.0f} s), {os.cpu_count()} CPUs, {load()}")
    try:
        imports, demo = import_seconds(env), generate(env, work / "cache-startup", args.overrides)
        print(
            f"  start-up: import glint_lightning.train {imports:.1f} s; the quickstart's demo set generated in "
            f"{demo:.1f} s ({'inside each timed run' if args.cold else 'cached: outside the timing'})"
        )
        if not args.cold:
            for extra in variants.values():  # each variant's cached set, generated before any timing
                generate(env, warm_cache, extra)
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(args.repeats):
            for name, extra in variants.items():
                cache = work / f"cache-{r}-{len(results[name])}-{name.replace(' ', '')}" if args.cold else warm_cache
                run_dir = work / f"{name.replace(' ', '-')}-{r}"
                res = run(extra, run_dir, cache, env)
                results[name].append(res)
                print(
                    f"  run {r + 1}/{args.repeats} {name:12s} {res['seconds']:6.1f} s  val/iou "
                    f"{fmt(res['val_iou'], '.4f')}  first >= {TARGET_IOU} at {fmt(res['reached_s'], '.1f')} s  "
                    f"CPU {res['cpu_s']:.0f} s  ({res['load']})",
                    flush=True,
                )
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    dest = args.keep / name.replace(" ", "-")
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(run_dir, dest)
                if args.cold:
                    shutil.rmtree(cache, ignore_errors=True)
        header = ("variant", "best s", "CPU s", "x wall", "x CPU", "val/iou", "test/iou")
        print("  {:12s} {:>7s} {:>6s} {:>6s} {:>6s} {:>8s} {:>8s}".format(*header), end="")
        print("  per epoch of the fastest run: s from start (val/iou)")
        fastest = {name: min(runs, key=lambda x: x["seconds"]) for name, runs in results.items()}
        least_cpu = {name: min(x["cpu_s"] for x in runs) for name, runs in results.items()}
        for name, best in fastest.items():
            per_epoch = "  ".join(f"{at:.0f}s ({fmt(iou, '.3f')})" for _, at, iou in best["epochs"])
            ok = best["seconds"] <= TARGET_S and (best["val_iou"] or 0) >= TARGET_IOU
            wall = best["seconds"] / fastest["quickstart"]["seconds"]
            cpu = least_cpu[name] / least_cpu["quickstart"]
            print(
                f"  {name:12s} {best['seconds']:7.1f} {least_cpu[name]:6.0f} {wall:6.2f} {cpu:6.2f} "
                f"{fmt(best['val_iou'], '.4f'):>8s} {fmt(best['test_iou'], '.4f'):>8s}  {per_epoch}  "
                f"{'meets' if ok else 'misses'} the target"
            )
            if name != "quickstart":
                print(f"  {'':12s} overrides: {' '.join(variants[name])}")
        print(f"  ({load()} at the end)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
