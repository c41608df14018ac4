"""Does a glint-plan plan fit its wall-clock budget, and does it train better than the default config and an
expert's hand config given the same time? (issue 21's figures; a benchmark, not a timed test)

    python -m benchmarks.plan_budget [--layouts demo sparse128 blobs48] [--budget 3] [--demo-budget S]
        [--threads N] [--keep DIR] [--smoke]

- demo: the quickstart (`experiment=quickstart`) is run and timed first; the plan is made for the demo set the
  quickstart trains on with budget = the quickstart's own wall time, and again with 3x it. Targets: val IoU >= the
  quickstart's (0.72 on the idle machine), the planned run ending within 15 % of its budget; with 3x the budget a
  val IoU above the quickstart's.
- sparse128 / blobs48 (benchmarks/plan_layouts.py): with --budget minutes each, the planned run against the default
  config (`data=h5` and the file options only) and an expert's simple hand config (the quickstart's recipe: U-Net
  16/3, batch 8, channels_last, Adam 6e-3), both stopped by `trainer.max_time` = budget less RESERVE_S for start-up,
  calibration and test. Targets: planned >= default + 0.05 val IoU, planned >= expert, within 15 % of the budget.

Every run is a `python -m glint_lightning.train` subprocess timed from start to exit; IoU is the best val/iou of its
metrics.json. Planning (fingerprint + step timing) runs before and is timed apart: the budget is the training run's.
--smoke: one layout (sparse128, fewer tiles) at a 1-minute budget, to check that the script works.
Wall-clock figures are only meaningful on an otherwise idle machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.plan_layouts import layout_files

RESERVE_S = 20  # of a baseline's budget kept for start-up, calibration and test (its max_time is the rest)
WITHIN = 0.15
EXPERT = (
    "model.base_channels=16 model.depth=3 data.batch_size=8 channels_last=true optimizer.lr=6e-3 scheduler=none "
    "trainer.max_epochs=100000 trainer.num_sanity_val_steps=0"
)
SIZES = {"full": {"sparse128": (2048, 256, 256), "blobs48": (4096, 512, 512)}, "smoke": {"sparse128": (512, 64, 64)}}


def load() -> str:
    return "load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result


def max_time(seconds: float) -> str:
    s = max(int(seconds), 1)
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Bench:
    def __init__(self, work: Path, env: dict[str, str], cache: Path) -> None:
        self.work, self.env, self.cache, self.rows = work, env, cache, []

    def train(self, name: str, args: list[str], budget_s: float | None, layout: str) -> dict:
        run_dir = self.work / "runs" / f"{layout}-{name}"
        flags = [a for i, a in enumerate(args) if a.startswith("--") or (i and args[i - 1].startswith("--"))]
        overrides = [a for a in args if a not in flags]  # Hydra takes its flags before the overrides
        cmd = [sys.executable, "-m", "glint_lightning.train", *flags, f"hydra.run.dir={run_dir}", *overrides]
        cmd.append(f"paths.cache_dir={self.cache}")
        seconds, _ = run(cmd, self.env)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = {
            "layout": layout,
            "variant": name,
            "budget_s": budget_s,
            "wall_s": seconds,
            "iou": metrics.get("best_score"),
            "steps": metrics.get("global_step"),
            "load": load(),
        }
        self.rows.append(row)
        ratio = f"{seconds / budget_s:.2f}" if budget_s else "-"
        print(
            f"  {layout:9s} {name:16s} {seconds:6.1f} s (x{ratio} of budget)  best val/iou {row['iou']:.4f}  "
            f"steps {row['steps']}  ({row['load']})",
            flush=True,
        )
        return row

    def plan(self, layout: str, data: list[str], budget_s: float, tag: str) -> list[str]:
        """Plan; returns the train arguments that run it."""
        out = self.work / "plans"
        cmd = [sys.executable, "-m", "glint_lightning.plan", *data, f"budget={budget_s / 60:.4f}", f"name={tag}"]
        cmd += [f"out_dir={out}", f"paths.cache_dir={self.cache}"]
        seconds, result = run(cmd, self.env)
        print(
            f"  plan {tag} ({seconds:.0f} s to plan):\n" + "\n".join("    " + ln for ln in result.stdout.splitlines())
        )
        return ["--config-dir", str(out), f"experiment={tag}"]


def demo(bench: Bench, budget_s: float | None, n_train: int) -> None:
    quick = bench.train("quickstart", ["experiment=quickstart"], None, "demo")  # its own time, no budget
    budget = budget_s or quick["wall_s"]
    data = [f"data.demo.n_train={n_train}"]
    for factor in (1, 3):
        tag = f"demo_x{factor}"
        args = bench.plan("demo", data, budget * factor, tag)
        row = bench.train(f"planned x{factor}", args, budget * factor, "demo")
        better = row["iou"] > quick["iou"] if factor == 3 else row["iou"] >= quick["iou"]
        fits = abs(row["wall_s"] / row["budget_s"] - 1) <= WITHIN
        print(
            f"    -> {'meets' if better and fits else 'misses'}: val/iou {row['iou']:.4f} vs quickstart "
            f"{quick['iou']:.4f}, wall x{row['wall_s'] / row['budget_s']:.2f} of the budget"
        )


def layout(bench: Bench, name: str, budget_s: float, sizes: tuple[int, int, int]) -> None:
    files = layout_files(bench.work.parent / "layouts", name, *sizes)
    data = ["data=h5", *(f"data.{split}_path={path}" for split, path in files.items())]
    limit = f"+trainer.max_time={max_time(budget_s - RESERVE_S)}"
    default = bench.train("default", [*data, limit], budget_s, name)
    expert = bench.train("expert", [*data, *shlex.split(EXPERT), limit], budget_s, name)
    planned = bench.train("planned", bench.plan(name, data, budget_s, name), budget_s, name)
    ok = (
        planned["iou"] >= default["iou"] + 0.05
        and planned["iou"] >= expert["iou"]
        and abs(planned["wall_s"] / budget_s - 1) <= WITHIN
    )
    print(
        f"    -> {'meets' if ok else 'misses'}: planned {planned['iou']:.4f}, default {default['iou']:.4f} "
        f"(+{planned['iou'] - default['iou']:.4f}), expert {expert['iou']:.4f}, "
        f"wall x{planned['wall_s'] / budget_s:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["demo", "sparse128", "blobs48"])
    parser.add_argument("--budget", type=float, default=3.0, help="minutes for sparse128 / blobs48")
    parser.add_argument("--demo-budget", type=float, help="seconds for the demo (default: the quickstart's wall time)")
    parser.add_argument("--demo-train", type=int, default=1024, help="demo training tiles (the quickstart's 1024)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    parser.add_argument("--keep", type=Path, help="keep the work folder (plans, runs, data) here")
    parser.add_argument("--smoke", action="store_true", help="sparse128 with fewer tiles at a 1-minute budget")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    layouts, budget, sizes = args.layouts, args.budget * 60, SIZES["full"]
    if args.smoke:
        layouts, budget, sizes = ["sparse128"], 60.0, SIZES["smoke"]
    root = args.keep or Path(
        tempfile.mkdtemp(prefix="bench-plan-", dir="outputs" if Path("outputs").is_dir() else None)
    )
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("GLINT_CACHE_DIR", "outputs/cache")).resolve()
    bench = Bench(work, env, cache)
    print(f"plan_budget: {os.cpu_count()} CPUs, {load()}, layouts {' '.join(layouts)}")
    try:
        for name in layouts:
            if name == "demo":
                demo(bench, args.demo_budget, args.demo_train)
            else:
                layout(bench, name, budget, sizes[name])
        print(f"\n  {'layout':9s} {'variant':16s} {'budget s':>8s} {'wall s':>7s} {'x budget':>8s} {'val/iou':>8s}")
        for r in bench.rows:
            x = f"{r['wall_s'] / r['budget_s']:.2f}" if r["budget_s"] else "-"
            b = f"{r['budget_s']:.0f}" if r["budget_s"] else "-"
            print(f"  {r['layout']:9s} {r['variant']:16s} {b:>8s} {r['wall_s']:7.1f} {x:>8s} {r['iou']:8.4f}")
        print(f"  ({load()} at the end)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
