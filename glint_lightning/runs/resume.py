"""Which checkpoint `ckpt_path` means, and whether it fits the composed config. Never silently start over."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glint_lightning.checkpoints.reader import TRAINING_KEYS, load_checkpoint
from glint_lightning.runs import slurm
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.log import get_logger
from glint_lightning.utils.options import is_unset

log = get_logger(__name__)

LAST = "last.ckpt"


def resolve_ckpt_path(value: str | None, ckpt_dir: Path, outputs_root: Path) -> Path | None:
    """`null` -> None; `last` -> this run's last.ckpt, else the newest last.ckpt under outputs_root; a path -> itself.

    Lightning's own `ckpt_path="last"` only looks in the current checkpoint dir and quietly starts from scratch
    when it finds nothing; Hydra gives every run a new dir, so we resolve it here and fail loudly instead.
    """
    if is_unset(value):
        return None
    if str(value) == "last":
        here = ckpt_dir / LAST
        if here.is_file():
            log.info(f"ckpt_path=last: resuming this run in place from {here}")
            return here
        found = [p for p in outputs_root.rglob(LAST) if p.is_file()] if outputs_root.is_dir() else []
        if not found:
            raise GlintError(
                f"ckpt_path=last: no {LAST} in {ckpt_dir} nor under {outputs_root}/; pass "
                "hydra.run.dir=<earlier run dir> or ckpt_path=/path/to/file.ckpt"
            )
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info(f"ckpt_path=last: resuming from the newest {LAST} under {outputs_root}/: {newest}")
        return newest
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise GlintError(f"ckpt_path={value}: no such file; pass an existing .ckpt file or ckpt_path=last")
    return path


def resolve_resume(value: str | None, run_dir: Path, outputs_root: Path) -> Path | None:
    """The checkpoint `train` resumes from: `ckpt_path` as `resolve_ckpt_path` resolves it, except in a requeued
    SLURM job (pre-empted, or requeued at its time limit), which continues its own run dir's last.ckpt whatever
    `ckpt_path` says: the job's first run started from that value, and everything since is in last.ckpt."""
    job = slurm.requeued()
    last = run_dir / "checkpoints" / LAST
    if job is None or not last.is_file():
        if job is not None and slurm.global_rank() == 0:
            log.info(f"SLURM {job}: no {LAST} in {run_dir} yet; starting as the first run did")
        return resolve_ckpt_path(value, run_dir / "checkpoints", outputs_root)
    if slurm.global_rank() == 0:
        ckpt = load_checkpoint(last)
        log.info(
            f"SLURM {job}: resuming from {last} (epoch {finished_epochs(ckpt)}, step {ckpt.get('global_step', 0)})"
        )
    return last


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def config_differences(stored: Mapping[str, Any], composed: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: stored -> composed'."""
    a, b = _flatten(stored), _flatten(composed)
    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def check_resumable(path: Path, model_cfg: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Refuse a checkpoint whose stored model config differs from the composed one (keys in `ignore` aside, and the
    training keys older checkpoints kept there)."""
    ignore = (*ignore, *TRAINING_KEYS)
    ckpt = load_checkpoint(path)
    stored = (ckpt.get("hyper_parameters") or {}).get("model")
    if stored is None:
        raise GlintError(
            f"{path}: no model config stored in the checkpoint; it was not written by glint_lightning.train"
        )
    diffs = config_differences(
        {k: v for k, v in stored.items() if k not in ignore}, {k: v for k, v in model_cfg.items() if k not in ignore}
    )
    if diffs:
        raise GlintError(
            f"{path}: its model config differs from this run's ({'; '.join(f'model.{d}' for d in diffs)}); "
            "override the model to match or start a new run without ckpt_path"
        )
    return ckpt


def finished_epochs(ckpt: Mapping[str, Any]) -> int:
    """Epochs the checkpoint has finished (Lightning's `epoch` is the index of the one it was saved in)."""
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(ckpt.get("epoch", 0))


def check_length(path: Path, ckpt: Mapping[str, Any], max_epochs: int | None, max_steps: int | None) -> None:
    """Refuse a resume whose trainer.max_epochs / max_steps leave nothing to train (Lightning would either raise
    a traceback or stop at once)."""
    done, step = finished_epochs(ckpt), int(ckpt.get("global_step", 0))
    held = f"the checkpoint holds {done} finished epoch{'s' * (done != 1)} (global step {step})"
    if max_epochs is not None and max_epochs != -1 and max_epochs <= done:
        raise GlintError(
            f"{path}: {held}, so trainer.max_epochs={max_epochs} leaves nothing to train; pass "
            f"trainer.max_epochs={done + 1} or more to train longer"
        )
    if max_steps is not None and max_steps != -1 and max_steps <= step:
        raise GlintError(
            f"{path}: {held}, so trainer.max_steps={max_steps} leaves nothing to train; pass "
            f"trainer.max_steps={step + 1} or more (or trainer.max_steps=-1) to train longer"
        )


# Scheduler keys that say how long the schedule is (in `interval` units): a change is "train longer".
LENGTH_KEYS = ("scheduler.T_max", "scheduler.total_iters")
SCHEDULER_NAMES = {"CosineAnnealingLR": "cosine", "LinearLR": "linear", "ExponentialLR": "exponential"}


@dataclass
class ResumePlan:
    """What a resume does beyond Lightning's restore: rebuild the LR schedule for this run's config (advanced by
    `steps` scheduler steps) and which settings differ from the checkpoint's."""

    rebuild: bool = False
    steps: int = 0
    schedule: str = ""  # e.g. "cosine over 2 -> 4 epochs", completed with where it continues
    at: str = ""  # e.g. "epoch 2" or "step 24"
    fresh_optimizer: str = ""  # why the stored optimizer state cannot be used (empty: it is kept)
    differences: list[str] = field(default_factory=list)

    def warning(self) -> str | None:
        """The one warning line naming the settings that differ from the checkpoint's, or None."""
        if not self.differences:
            return None
        more = len(self.differences) - 6
        shown = "; ".join(self.differences[:6]) + (f" (and {more} more)" if more > 0 else "")
        return f"resuming with settings that differ from the checkpoint's; this run's apply from {self.at}: {shown}"


def _scheduler_name(sched: Mapping[str, Any] | None) -> str:
    target = str(((sched or {}).get("scheduler") or {}).get("_target_", ""))
    return SCHEDULER_NAMES.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1] or "constant")


def _scheduler_steps(
    ckpt: Mapping[str, Any], stored: Mapping[str, Any] | None, composed: Mapping[str, Any], done: int
) -> int:
    """How many times the resumed run's scheduler would have stepped: the stored count when the stepping rule is
    unchanged, else counted from the epochs / steps done (as Lightning steps: every `frequency` epochs or steps)."""
    rule = ("interval", "frequency")
    states = ckpt.get("lr_schedulers") or []
    if states and stored and all(stored.get(k) == composed.get(k) for k in rule) and "last_epoch" in states[0]:
        return int(states[0]["last_epoch"])
    frequency = max(int(composed.get("frequency", 1) or 1), 1)
    if composed.get("interval", "epoch") == "step":
        return int(ckpt.get("global_step", 0)) // frequency
    return done // frequency


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "none"


def _group_differences(group: str, stored: Mapping[str, Any], composed: Mapping[str, Any], target: str) -> list[str]:
    """'group.key: stored -> composed' entries; a different class (`target` key) is one entry naming both."""
    a, b = _flatten(stored).get(target), _flatten(composed).get(target)
    if a != b:
        return [f"{group}: {_short(a)} -> {_short(b)}"]
    return [f"{group}.{d}" for d in config_differences(stored, composed)]


def plan_resume(ckpt: Mapping[str, Any], hparams: Mapping[str, Any], data: Mapping[str, Any]) -> ResumePlan:
    """Compare the checkpoint's optimizer / scheduler / loss / data config with this run's (`hparams` of the
    freshly built module, `data` the composed data config)."""
    stored_hp = ckpt.get("hyper_parameters") or {}
    stored_data = (stored_hp.get("config") or {}).get("data")
    done, step = finished_epochs(ckpt), int(ckpt.get("global_step", 0))
    sched = hparams.get("scheduler") if (hparams.get("scheduler") or {}).get("scheduler") else None
    stored_sched = stored_hp.get("scheduler") if (stored_hp.get("scheduler") or {}).get("scheduler") else None
    unit = (sched or {}).get("interval", "epoch")
    plan = ResumePlan(at=f"step {step}" if unit == "step" else f"epoch {done}")

    opt, stored_opt = hparams.get("optimizer") or {}, stored_hp.get("optimizer") or {}
    sched_diffs = config_differences(stored_sched or {}, sched or {})
    length = [d.split(":")[0] for d in sched_diffs if d.split(":")[0] in LENGTH_KEYS]
    other_sched = {k: v for k, v in _flatten(sched or {}).items() if k not in length}
    stored_other_sched = {k: v for k, v in _flatten(stored_sched or {}).items() if k not in length}
    plan.differences = [
        *_group_differences("optimizer", stored_opt, opt, "_target_"),
        *_group_differences("scheduler", stored_other_sched, other_sched, "scheduler._target_"),
        *_group_differences("loss", stored_hp.get("loss") or {}, hparams.get("loss") or {}, "_target_"),
        *(_group_differences("data", stored_data, data, "_target_") if stored_data is not None else []),
    ]
    if stored_opt.get("_target_") != opt.get("_target_"):
        plan.fresh_optimizer = f"{_short(stored_opt.get('_target_'))} -> {_short(opt.get('_target_'))}"
    no_state = "optimizer_states" not in ckpt
    plan.rebuild = bool(sched_diffs or config_differences(stored_opt, opt) or (no_state and sched))
    if not plan.rebuild:
        return plan
    plan.steps = _scheduler_steps(ckpt, stored_sched, sched or {}, done) if sched else 0
    name, units = _scheduler_name(sched), "steps" if unit == "step" else "epochs"
    if not sched:
        plan.schedule = "constant learning rate"
    elif length and _scheduler_name(stored_sched) == name:
        old, new = _flatten(stored_sched).get(length[0]), _flatten(sched).get(length[0])
        warmup = int(sched.get("warmup_epochs", 0) or 0)
        after = f" (after a warm-up of {warmup} {units[:-1] if warmup == 1 else units})" if warmup else ""
        plan.schedule = f"{name} over {old} -> {new} {units}{after}"
    elif no_state:
        plan.schedule = f"{name} rebuilt (the checkpoint holds no optimizer state)"
    else:
        plan.schedule = f"{name} rebuilt for this run's settings"
    return plan
