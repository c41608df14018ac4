"""`glint-plan` / `python -m glint_lightning.plan [data.*=...] budget=10 device=auto name=... out_dir=plans`:
fingerprint a data set, time real training steps on the device, and write a commented experiment config that
`glint-train --config-dir <out_dir> experiment=<name>` runs as is, sized to the wall-clock budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from glint_lightning.data.fingerprint import fingerprint
from glint_lightning.runs.planning import (
    CKPT_S,
    EVAL_OVERHEAD,
    FIT_START_S,
    LIGHTNING_STEP_OVERHEAD,
    MAX_VALIDATIONS,
    MIN_TILES,
    POSTPROCESS_S_PER_MPX,
    TARGET,
    TEST_OVERHEAD,
    VALIDATION_SHARE,
    Budget,
    Choice,
    choose_batch,
    choose_depth,
    choose_split_by,
    choose_width,
    depth_clip_choice,
    learning_rate,
    loss_choices,
    postprocess_choice,
    schedule,
    solve_budget,
    tiles_wanted,
)
from glint_lightning.runs.step_timing import StepTiming, eval_tiles_per_s, resolve_device, time_steps
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError

CANDIDATES = {  # (base channels, batch sizes) timed per device type
    "cpu": ((8, 16, 32), (8, 32)),
    "cuda": ((16, 32, 64), (8, 32, 128)),
}
TIMED_STEPS = {"cpu": 5, "cuda": 10}  # timed steps per candidate (after 2 untimed warm-up steps); the median counts
HELPS = 1.05  # channels_last / bf16 are kept when they make a step at least 5 % faster
EVAL_BATCH = {"cpu": 128, "cuda": 256}
MEMORY_SHARE = 0.8  # of the GPU's memory a candidate may use


@cache
def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import the training entry point: the run's start-up, measured."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import glint_lightning.train"], check=True, capture_output=True)
    return time.perf_counter() - start


def _group(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml"))


def module_config(base: int, depth: int, alpha: float, lr: float) -> dict[str, Any]:
    """model/loss/optimizer as the plan will compose them (conf/model/unet, loss/hybrid, optimizer/adam)."""
    loss = _group("loss/hybrid")
    loss["terms"]["focal"]["alpha"] = alpha
    return {
        "model": {**_group("model/unet"), "base_channels": base, "depth": depth},
        "loss": loss,
        "optimizer": {**_group("optimizer/adam"), "lr": lr},
    }


def check_budget(budget: Any) -> float:
    try:
        minutes = float(budget)
    except (TypeError, ValueError):
        minutes = float("nan")
    if not minutes > 0 or math.isinf(minutes):
        raise GlintError(f"budget={budget}: give the minutes of wall clock for the training run, e.g. budget=10")
    return minutes


def check_data(fp: dict[str, Any], label: str) -> None:
    train = fp["splits"]["train"]
    if train["tiles"] < MIN_TILES:
        raise GlintError(
            f"{label}: {train['tiles']} training tiles; a plan needs at least {MIN_TILES} (more tiles, or a smaller "
            "data.val_fraction/test_fraction)"
        )
    if not any(s["glints"] for s in fp["splits"].values()):
        read = sum(s["tiles_read"] for s in fp["splits"].values())
        raise GlintError(
            f"{label}: no glint in the {read} tiles read (every mask is 0); check data.keys.mask or the masks"
        )
    if not train["glints"]:
        raise GlintError(f"{label}: no glint in the training tiles read; the network would learn nothing")


def _absolute(value: Any) -> Any:
    """Paths (files, globs, lists of them) as given, made absolute: the plan may be trained from anywhere."""
    if value is None:
        return None
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    return os.path.abspath(os.path.expanduser(str(value)))


def default_name(data: DictConfig) -> str:
    path = data.get("train_path")
    if path is None:
        return "demo"
    first = path[0] if not isinstance(path, str) else path
    stem = Path(str(first)).stem.replace("*", "").strip("_-.") or "data"
    return stem


def data_choices(data: DictConfig) -> list[Choice]:
    """The data options as given to glint-plan, so the plan trains on the same files and splits."""
    if data.get("demo") is not None:
        demo = OmegaConf.to_container(data.demo)
        return [
            Choice(f"data.demo.{k}", demo[k], "the demo set as given to glint-plan")
            for k in ("n_train", "n_val", "n_test", "tile", "seed")
        ]
    given = "as given to glint-plan (absolute)"
    out = [Choice(f"data.{k}_path", _absolute(data.get(f"{k}_path")), given) for k in ("train", "val", "test")]
    for key in ("val_fraction", "test_fraction", "split_seed", "depth_scale"):
        out.append(Choice(f"data.{key}", data.get(key), "as given to glint-plan"))
    out.append(Choice("data.keys", OmegaConf.to_container(data["keys"]), "dataset names as given to glint-plan"))
    return out


def _time_grid(
    dm: Any, device: torch.device, depth: int, alpha: float, stats: tuple[float, float]
) -> tuple[bool, bool, dict[int, list[StepTiming]], float]:
    """channels_last and bf16 decided on the middle width at the smallest batch, then every width x batch;
    returns both decisions, the grid of timings and how much faster channels_last made the step."""
    train = dm.datasets["train"]
    bases, batches = CANDIDATES[device.type]
    batches = tuple(b for b in batches if b <= len(train)) or (len(train),)
    steps = TIMED_STEPS[device.type]

    def timed(base: int, batch: int, cl: bool, bf16: bool) -> StepTiming:
        cfg = module_config(base, depth, alpha, learning_rate(batch))
        return time_steps(cfg, train, batch, device, cl, bf16, steps=steps, stats=stats)

    plain = timed(bases[1], batches[0], False, False)
    nhwc = timed(bases[1], batches[0], True, False)
    channels_last = plain.step_s / nhwc.step_s >= HELPS
    bf16 = False
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        mixed = timed(bases[1], batches[0], channels_last, True)
        bf16 = (nhwc if channels_last else plain).step_s / mixed.step_s >= HELPS
    grid = {base: [timed(base, b, channels_last, bf16) for b in batches] for base in bases}
    return channels_last, bf16, grid, plain.step_s / nhwc.step_s


def make_plan(cfg: DictConfig, dm: Any, fp: dict[str, Any], device: torch.device, setup_s: float) -> dict[str, Any]:
    """Every choice with its reason, and the budget it fills."""
    train_fp = fp["splits"]["train"]
    tile = tuple(train_fp["tile"])
    n_train, n_val = len(dm.datasets["train"]), len(dm.datasets["val"])
    n_test = len(dm.datasets["test"]) if "test" in dm.datasets else 0
    depth = choose_depth(tile, (train_fp["glint_extent_px"] or {}).get("p95"))
    losses = loss_choices(train_fp["glint_share"] or 0.0, train_fp["empty_tile_share"] or 0.0)
    alpha = losses[1].value
    post = postprocess_choice(train_fp["glint_size_px"])
    search_s = n_val * tile[0] * tile[1] / 1e6 * POSTPROCESS_S_PER_MPX if post.value else 0.0  # CPU work, any device
    eval_batch = min(EVAL_BATCH[device.type], max(n_val, 1))
    startup = import_seconds() + setup_s
    fit_start = FIT_START_S[device.type]
    if cfg.budget * 60 * TARGET <= startup + fit_start:  # refused before any step is timed
        raise GlintError(
            f"budget={cfg.budget:g} is too small for one epoch: start-up alone takes ~{startup + fit_start:.0f} s; "
            f"give budget={math.ceil((startup + fit_start) / TARGET / 6) / 10 + 0.1:g} (minutes) or more"
        )
    channels_last, bf16, grid, cl_gain = _time_grid(dm, device, depth.value, alpha, dm.depth_stats)
    limit = (
        torch.cuda.get_device_properties(device).total_memory / 2**20 * MEMORY_SHARE if device.type == "cuda" else None
    )
    per_width: dict[int, tuple[StepTiming, Budget]] = {}
    refusal: GlintError | None = None
    for base, timings in grid.items():
        fitting = [t for t in timings if limit is None or t.memory_mb <= limit] or timings[:1]
        chosen = choose_batch(fitting)
        cfg_m = module_config(base, depth.value, alpha, learning_rate(chosen.batch_size))
        tps = eval_tiles_per_s(cfg_m, dm.datasets["val"], eval_batch, device, channels_last, bf16)
        val_s = n_val / tps * EVAL_OVERHEAD
        budget = Budget(
            total_s=cfg.budget * 60,
            startup_s=startup,
            fit_start_s=fit_start,
            step_s=chosen.step_s * LIGHTNING_STEP_OVERHEAD,
            validation_s=val_s,
            calibration_s=val_s + search_s + CKPT_S,
            test_s=(n_test / tps * TEST_OVERHEAD + CKPT_S) if n_test else 0.0,
            modelled=[
                f"fit start {fit_start:g} s",
                f"the training loop x{LIGHTNING_STEP_OVERHEAD} of the timed step (measured on a 2-core CPU)",
                f"validation x{EVAL_OVERHEAD} and test x{TEST_OVERHEAD} of the timed forward passes",
                f"checkpoint loads {CKPT_S:g} s",
                *([f"post-processing search {POSTPROCESS_S_PER_MPX:g} s per million val pixels"] if post.value else []),
            ],
        )
        try:
            per_width[base] = (chosen, solve_budget(budget, n_train, chosen.batch_size))
        except GlintError as err:
            refusal = refusal or err
    if not per_width:
        raise refusal  # type: ignore[misc]
    base = choose_width(per_width)
    step, budget = per_width[base]
    warmup, cosine = schedule(budget.steps)
    lr = learning_rate(step.batch_size)
    speeds = ", ".join(
        f"{b}: {per_width[b][0].tiles_per_s:.0f} tiles/s at batch {per_width[b][0].batch_size}, "
        f"{per_width[b][1].steps} steps"
        for b in sorted(per_width)
    )
    hours, rest = divmod(math.ceil(budget.train_s * 1.1), 3600)
    max_time = f"00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    precision = "bf16-mixed" if bf16 else "32-true"
    choices = [
        *data_choices(cfg.data),
        choose_split_by(fp["frames"], len({p for s in fp["splits"].values() for p in s["files"]})),
        Choice(
            "data.batch_size",
            step.batch_size,
            f"smallest batch within 80 % of the best tiles/s at width {base} "
            "(more small steps beat fewer large ones in a fixed time)",
        ),
        Choice("data.eval_batch_size", eval_batch, "validation and test batches (no gradients: larger fits)"),
        Choice(
            "data.norm_samples",
            min(n_train, 1024),
            "depth mean/std from this many training tiles (invalid "
            f"pixels excluded; valid depth spans {_pct(train_fp['depth_mm'])} mm, p0.5/p50/p99.5)",
        ),
        depth_clip_choice(train_fp["depth_mm"]),
        Choice("data.augment.hflip", True, "glints have no preferred side: flips and 90-degree turns are free data"),
        Choice("data.augment.vflip", True, "as hflip"),
        Choice("data.augment.rot90", True, "as hflip"),
        Choice("data.augment.depth_noise", 0.0, "the sensor's own noise is in the tiles; none added"),
        depth,
        Choice(
            "model.base_channels",
            base,
            f"widest that sees {tiles_wanted(base)} training tiles (steps x batch) in the budget (timed: {speeds})",
        ),
        Choice(
            "channels_last",
            channels_last,
            f"NHWC step {cl_gain:.2f}x the NCHW one on {device.type} (kept when >= {HELPS}x)",
        ),
        Choice(
            "trainer.precision",
            precision,
            "bf16 autocast timed faster by >= 5 %"
            if bf16
            else ("fp32: bf16 did not measurably help" if device.type == "cuda" else "fp32 on the CPU"),
        ),
        Choice("optimizer.lr", lr, "Adam + BatchNorm: 6e-3 at batch 8 (quickstart), x sqrt(batch/8), at most 1e-2"),
        *losses,
        Choice("scheduler.interval", "step", "per-step schedule: the run is a fixed number of steps"),
        Choice("scheduler.warmup_epochs", warmup, "linear warm-up in steps (4 % of the run, at least 20)"),
        Choice("scheduler.scheduler.T_max", cosine, "cosine over the steps after the warm-up, to the last step"),
        Choice(
            "trainer.max_steps",
            budget.steps,
            f"{budget.step_s:.3f} s a step (timed, x Lightning's overhead) fill "
            f"{budget.total_s:.0f} s less the fixed costs",
        ),
        Choice("trainer.max_epochs", budget.epochs, f"{budget.steps_per_epoch} steps an epoch over {n_train} tiles"),
        Choice(
            "trainer.limit_train_batches",
            budget.limit_batches,
            f"epochs of this many of the {n_train // step.batch_size} batches: the steps fill the budget, and "
            "validation runs during training"
            if budget.limit_batches
            else "whole epochs",
        ),
        Choice(
            "trainer.check_val_every_n_epoch",
            budget.validate_every,
            f"{budget.validations} validations of {budget.validation_s:.1f} s each (at most {MAX_VALIDATIONS}, in at "
            f"most {VALIDATION_SHARE:.0%} of the training time; the last one at the end)",
        ),
        Choice("trainer.log_every_n_steps", min(10, budget.steps_per_epoch), "at least one logged step an epoch"),
        Choice("trainer.num_sanity_val_steps", 0, "no sanity pass: it costs a validation"),
        Choice("trainer.max_time", max_time, "safety net: fit stops here (planned fit time + 10 %)"),
        Choice("trainer.accelerator", "gpu" if device.type == "cuda" else "cpu", f"timed on {device}"),
        Choice("trainer.devices", [device.index or 0] if device.type == "cuda" else 1, "one device, as timed"),
        Choice("calibrate_threshold", True, "store the threshold maximising val F1 (counted in the budget)"),
        post,
        Choice("callbacks.progress.refresh_rate", 20, "fewer progress updates"),
    ]
    return {"choices": choices, "budget": budget, "step": step, "device": str(device), "grid": grid}


def _pct(p: dict[str, float] | None) -> str:
    return "none" if not p else " / ".join(f"{v:g}" for v in p.values())


def _nest(choices: list[Choice]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for c in choices:
        if c.key.startswith("#"):
            continue
        *parents, leaf = c.key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = c
    return tree


def render(plan: dict[str, Any], fp_path: Path, cfg: DictConfig, name: str) -> str:
    """The experiment config: `# @package _global_`, the budget as comments, each choice commented with why."""
    b: Budget = plan["budget"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# @package _global_",
        f"# Planned by glint-plan on {when} for a budget of {cfg.budget:g} min on {plan['device']}; fingerprint: "
        f"{fp_path}",
        f"# Run: glint-train --config-dir {cfg.out_dir} experiment={name}",
        f"# Planned seconds: start-up {b.startup_s:.1f} (measured: imports + data setup), "
        f"fit start {b.fit_start_s:.1f}, "
        f"{b.steps} steps x {b.step_s:.3f} = {b.steps * b.step_s:.1f}, {b.validations} validations x "
        f"{b.validation_s:.1f}, calibration {b.calibration_s:.1f}, test {b.test_s:.1f}: {b.planned_s:.0f} of "
        f"{b.total_s:.0f}",
        f"# Modelled, not measured: {'; '.join(b.modelled)}",
    ]
    for c in plan["choices"]:
        if c.key.startswith("#"):
            lines.append(f"# {c.key[1:]}: {c.value} ({c.why})")
    if cfg.data.get("demo") is None:
        lines += ["defaults:", "  - override /data: h5"]

    def emit(node: dict[str, Any], indent: int) -> None:
        for key, value in node.items():
            pad = "  " * indent
            if isinstance(value, dict):
                lines.append(f"{pad}{key}:")
                emit(value, indent + 1)
            else:
                lines.append(f"{pad}{key}: {json.dumps(value.value)}  # {value.why}")

    emit(_nest(plan["choices"]), 0)
    return "\n".join(lines) + "\n"


def table(plan: dict[str, Any], fp: dict[str, Any]) -> str:
    """What was chosen and why, one row each, after a line on the data."""
    t = fp["splits"]["train"]
    size = t["glint_size_px"] or {}
    head = (
        f"data: {t['tiles']} train tiles of {t['tile'][0]}x{t['tile'][1]} px ({fp['depth_units']}), valid "
        f"{t['valid_share']:.0%}, glints {t['glint_share']:.2%} of valid px, {t['glints_per_tile']:.2f} a tile, "
        f"size p5/p50/p95 {_pct(size)} px, {t['empty_tile_share']:.0%} tiles without"
    )
    rows = [
        c
        for c in plan["choices"]
        if not c.key.startswith("data.") or c.key in ("data.batch_size", "data.split_by", "data.depth_clip")
    ]
    rows = [
        c
        for c in rows
        if c.key
        not in (
            "trainer.accelerator",
            "trainer.devices",
            "trainer.num_sanity_val_steps",
            "callbacks.progress.refresh_rate",
            "calibrate_threshold",
        )
    ]
    width = max(len(c.key.lstrip("#")) for c in rows)
    body = [f"  {c.key.lstrip('#'):<{width}}  {json.dumps(c.value):<14} {c.why}" for c in rows]
    b: Budget = plan["budget"]
    foot = (
        f"budget: {b.planned_s:.0f} s planned of {b.total_s:.0f} s (start-up {b.startup_s:.0f}, training "
        f"{b.steps * b.step_s:.0f}, validation {b.validations * b.validation_s:.0f}, calibration + test "
        f"{b.calibration_s + b.test_s:.0f}); step {plan['step'].step_s * 1000:.0f} ms, memory peak "
        f"{plan['step'].memory_mb:.0f} MB on {plan['device']}"
    )
    return "\n".join([head, *body, foot])


def _write_atomically(files: dict[Path, str]) -> None:
    """All files or none: each is written to a temporary beside it, then all are renamed."""
    temps = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            temps.append((tmp, path))
    except BaseException:
        for tmp, _ in temps:
            os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)


def plan(cfg: DictConfig) -> Path:
    """Fingerprint, time, plan, write; returns the experiment config's path."""
    check_budget(cfg.budget)
    device = resolve_device(str(cfg.device))
    name = cfg.name or default_name(cfg.data)
    if not str(name).replace("-", "").replace("_", "").isalnum():
        raise GlintError(f"name={name}: use letters, digits, - and _ (it becomes experiment=<name>)")
    start = time.perf_counter()
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    fp = fingerprint(dm.datasets, cfg.max_tiles, cfg.seed, dm.split_by)
    label = dm.datasets["train"].label
    check_data(fp, label)
    result = make_plan(cfg, dm, fp, device, setup_s)
    out = Path(cfg.out_dir)
    fp_path, exp_path = out / f"{name}.fingerprint.json", out / "experiment" / f"{name}.yaml"
    _write_atomically({fp_path: json.dumps(fp, indent=1) + "\n", exp_path: render(result, fp_path, cfg, name)})
    print(table(result, fp))
    print(f"fingerprint: {fp_path}\nplan:        {exp_path}")
    print(f"train with:  glint-train --config-dir {out} experiment={name}")
    return exp_path


@hydra_app("plan")
def main(cfg: DictConfig) -> Path:
    """glint-plan: a dataset fingerprint and a training plan that fits the time budget on the device."""
    return plan(cfg)


if __name__ == "__main__":
    main()
