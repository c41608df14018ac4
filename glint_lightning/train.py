"""`python -m glint_lightning.train [overrides]`: train, checkpoint, resume, and test at the end."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from glint_lightning.callbacks import CheckpointOnInterrupt, ResumeSchedule
from glint_lightning.callbacks.optuna_pruning import OptunaPruning
from glint_lightning.checkpoints.io import remove_stale_temporaries
from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.inference.calibration import calibrate_postprocess, calibrate_threshold, write_threshold
from glint_lightning.inference.postprocess import PostProcess
from glint_lightning.metrics import check_metric
from glint_lightning.models.common import check_network
from glint_lightning.module import WEIGHT_SOURCE_KEYS, GlintModule
from glint_lightning.runs.provenance import provenance
from glint_lightning.runs.resume import (
    check_length,
    check_resumable,
    plan_resume,
    resolve_resume,
)
from glint_lightning.runs.run_lock import RunLock
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError, Interrupted
from glint_lightning.utils.trust import LIGHTNING_GROUPS, check_targets


def check_config(cfg: DictConfig) -> None:
    """Fail fast, with one line, on options that would otherwise fail late or silently."""
    check_targets(OmegaConf.to_container(cfg), "the composed config", LIGHTNING_GROUPS)
    check_metric("optimized_metric", cfg.optimized_metric)
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and cb.get("monitor"):
            check_metric(f"callbacks.{name}.monitor", cb.monitor, cb.get("mode"))
    lr = cfg.optimizer.get("lr")
    if lr is None or not lr > 0:
        raise GlintError(f"optimizer.lr={lr}; the learning rate must be positive (e.g. optimizer.lr=1e-3)")
    if not cfg.data.batch_size or cfg.data.batch_size < 1:
        raise GlintError(f"data.batch_size={cfg.data.batch_size}; use a positive batch size (e.g. data.batch_size=16)")
    if cfg.trainer.get("max_epochs") is not None and cfg.trainer.max_epochs < 1:
        raise GlintError(f"trainer.max_epochs={cfg.trainer.max_epochs}; train for at least one epoch")
    if cfg.model.get("in_channels", 1) != 1:
        raise GlintError(
            f"model.in_channels={cfg.model.in_channels}: the input is one depth channel; use model.in_channels=1 "
            "(pretrained RGB first convolutions are adapted to it)"
        )
    if cfg.model.get("out_channels", 1) != 1:
        raise GlintError(
            f"model.out_channels={cfg.model.out_channels}: glint masks are binary, so a network gives one logit per "
            "pixel (the losses and metrics take (B, 1, H, W) logits); use model.out_channels=1"
        )


def build_module(cfg: DictConfig, tile_size: tuple[int, int] | None = None) -> GlintModule:
    """The LightningModule from plain data only (what checkpoints store and weights_only loading accepts)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        return GlintModule(
            model=plain["model"],
            loss=plain["loss"],
            optimizer=plain["optimizer"],
            scheduler=plain.get("scheduler"),
            threshold=plain["threshold"],
            ap_bins=plain["ap_bins"],
            seed=plain["seed"],
            aux_weight=plain.get("aux_weight", 0.5),
            tile_size=list(tile_size) if tile_size else None,
            config={k: v for k, v in plain.items() if k != "hydra"},
        )
    except InstantiationException as err:
        wrong = _wrong_arguments(err, plain)
        if wrong is None:
            raise
        raise wrong from None


def _wrong_arguments(err: InstantiationException, plain: dict[str, Any]) -> GlintError | None:
    """A constructor refusing its keyword arguments (e.g. `+model.colour=red`) is the user's mistake: one line
    naming the config group, instead of Hydra's traceback."""
    cause = err.__cause__
    text = str(cause)
    if not isinstance(cause, TypeError) or not ("keyword argument" in text or "required positional" in text):
        return None
    parts = text.split("(")[0].split(".")  # "UNet.__init__() got an unexpected keyword argument 'colour'"
    callee = parts[-2] if parts[-1] == "__init__" and len(parts) > 1 else parts[-1]
    group = next(
        (g for g in ("model", "loss") if str(plain.get(g, {}).get("_target_", "")).rsplit(".", 1)[-1] == callee),
        "model/loss",
    )
    return GlintError(f"{group}: {text}; fix the key (python -m glint_lightning.train --cfg job shows the config)")


def _plan_resume(cfg: DictConfig, ckpt_path: Path, module: GlintModule) -> list[L.Callback]:
    """Refuse what cannot resume; say what differs from the checkpoint; rebuild the LR schedule when it must."""
    ckpt = check_resumable(ckpt_path, module.hparams.model, ignore=WEIGHT_SOURCE_KEYS)
    check_length(ckpt_path, ckpt, cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps"))
    plan = plan_resume(ckpt, module.hparams, OmegaConf.to_container(cfg.data, resolve=True))
    warning = plan.warning()
    if warning and rank_zero_only.rank == 0:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if not plan.rebuild:
        return []
    return [ResumeSchedule(plan.steps, plan.schedule, plan.at, plan.fresh_optimizer)]


def _monitoring_checkpoint(trainer: L.Trainer, metric: str) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.checkpoint_callbacks if cb.monitor == metric), None)


def _float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in sorted(metrics.items())}


def train(cfg: DictConfig) -> float | None:
    """Train as configured; returns the best value of `optimized_metric` (for sweepers), or None."""
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    with _run_dir_lock(run_dir):  # before resolving: a refused train must not announce a resume it never does
        ckpt_path = resolve_resume(cfg.get("ckpt_path"), run_dir, Path(cfg.paths.outputs_root))
        return _train(cfg, run_dir, ckpt_path)


def _run_dir_lock(run_dir: Path) -> AbstractContextManager:
    """The run dir's lock, held by the process that writes the run's files (under DDP: global rank 0 only)."""
    node_rank = int(os.environ.get("NODE_RANK", "0") or 0)
    return RunLock(run_dir) if rank_zero_only.rank == 0 and node_rank == 0 else nullcontext()


def _train(cfg: DictConfig, run_dir: Path, ckpt_path: Path | None) -> float | None:
    ckpt_dir = run_dir / "checkpoints"
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    train_info = datamodule.datasets["train"].info
    module = build_module(cfg, tile_size=(train_info.height, train_info.width))
    check_network(module.model, f"model._target_={cfg.model._target_}")
    if cfg.get("channels_last"):
        module.model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):
        module.model.compile()  # in place: checkpoint keys stay those of the plain network
    stride = getattr(module.model, "stride", 1)
    if min(train_info.height, train_info.width) < stride:
        raise GlintError(
            f"{train_info.path}: tiles are {train_info.height}x{train_info.width} px, smaller than the model's total "
            f"stride of {stride} px (they would be mostly padding); use tiles of at least {stride}x{stride} px or a "
            "shallower model (e.g. model.depth=2)"
        )
    extra_callbacks: list[L.Callback] = []
    if ckpt_path is not None:
        extra_callbacks = _plan_resume(cfg, ckpt_path, module)
    else:
        module.set_depth_stats(*datamodule.depth_stats, clip=datamodule.depth_clip)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this function; one writes the run's files
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(ckpt_dir)
        datamodule.save_description(run_dir / "data.json")
        provenance_data = provenance(_overrides(), datamodule.data_files())  # every file of every split
        (run_dir / "provenance.json").write_text(json.dumps(provenance_data, indent=1))
    started = time.monotonic()

    callbacks = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb is not None]
    callbacks += extra_callbacks
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise GlintError(
            f"{ckpt_dir}: disk full while writing a checkpoint; the previous checkpoints are intact. Free space and "
            f"resume with hydra.run.dir={run_dir} ckpt_path=last"
        ) from None
    except SIGTERMException:
        raise _interrupted(trainer, run_dir) from None
    if trainer.interrupted:
        raise GlintError(f"training was interrupted; resume with hydra.run.dir={run_dir} ckpt_path=last")

    best_cb = _monitoring_checkpoint(trainer, cfg.optimized_metric)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_checkpoint": (best_cb.best_model_path or None) if best_cb else None,
        "last_checkpoint": str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").is_file() else None,
        "optimized_metric": cfg.optimized_metric,
        "best_score": float(best_cb.best_model_score) if best_cb and best_cb.best_model_score is not None else None,
        "duration_s": round(time.monotonic() - started, 1),
        "final": _float_metrics({k: v for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}),
        **OptunaPruning.summary(trainer),  # pruned_at_epoch: an Optuna pruner stopped this trial
    }
    if (cfg.get("calibrate_threshold") or cfg.get("calibrate_postprocess")) and summary["best_checkpoint"]:
        chosen = None
        if trainer.is_global_zero:
            summary["threshold"], chosen = _calibrate(
                module, datamodule, summary, bool(cfg.get("calibrate_postprocess"))
            )
        # every rank tests with rank 0's choice, as glint-eval scores with the stored one (the broadcast also waits for
        # rank 0 to have written the checkpoints)
        threshold, post = trainer.strategy.broadcast(chosen, src=0)
        module.set_threshold(threshold)
        module.test_postprocess = post.apply if post.active else None
    if cfg.get("test") and datamodule.has_split("test"):
        best = best_cb.best_model_path if best_cb and best_cb.best_model_path else None
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        summary["test"] = _float_metrics(results[0]) if results else {}
    if not trainer.is_global_zero:
        return None
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, _why_no_checkpoint(trainer, best_cb, cfg.optimized_metric))

    score = summary["best_score"]
    if score is None:
        score = summary["final"].get(cfg.optimized_metric)
    return None if score is None or math.isnan(score) else score


def _overrides() -> list[str]:
    """This job's command-line overrides (Hydra's), or [] when called without Hydra (tests, notebooks)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _interrupted(trainer: L.Trainer, run_dir: Path) -> Interrupted:
    """SIGTERM / Ctrl-C: one line saying what was saved and how to go on."""
    saver = next((cb for cb in trainer.callbacks if isinstance(cb, CheckpointOnInterrupt)), None)
    name = saver.signal_name if saver else "SIGTERM"
    if saver and saver.saved:
        saved = f"saved {saver.path}"
    else:
        saved = "kept the previous last.ckpt (no resumable state between an epoch's last batch and its end)"
    return Interrupted(
        f"{name} at epoch {trainer.current_epoch}, step {trainer.global_step}; {saved}. Resume with "
        f"python -m glint_lightning.train hydra.run.dir={run_dir} ckpt_path=last",
        signal.SIGINT if name == "Ctrl-C" else signal.SIGTERM,
    )


def _calibrate(
    module: GlintModule, datamodule: Any, summary: dict[str, Any], postprocess: bool
) -> tuple[dict[str, Any], tuple[float, PostProcess]]:
    """Pick the threshold maximising val F1 with the best weights (with `postprocess`, also the post-processing
    maximising val IoU, as glint-eval calibrate=true); store them in the best and last checkpoints, each saying it
    came from the best weights (last.ckpt may hold later ones). Returns the summary's record and (threshold,
    post-processing)."""
    best_path = Path(summary["best_checkpoint"])
    best = load_checkpoint(best_path)
    module.load_state_dict(best["state_dict"])
    loader = datamodule.eval_loader("val", shard=False)
    result: dict[str, Any] = {}
    chosen = PostProcess()  # none
    if postprocess:
        cal = calibrate_postprocess(module, loader, module.device)
        threshold, f1, record, chosen = cal.threshold, cal.val_f1, cal.selection.record(), cal.selection.postprocess
        result = {"postprocess": record, "selection": cal.selection.describe()}
    else:
        (threshold, f1), record = calibrate_threshold(module, loader, module.device), None
    weights = {"checkpoint": best_path.name, "epoch": best.get("epoch"), "global_step": best.get("global_step")}
    for path in {summary["best_checkpoint"], summary["last_checkpoint"]} - {None}:
        write_threshold(path, threshold, f1, {**weights, "role": "best"}, postprocess=record)
    return {"value": threshold, "val_f1": f1, **result}, (threshold, chosen)


def _why_no_checkpoint(trainer: L.Trainer, best_cb: ModelCheckpoint | None, metric: str) -> str:
    """Why the summary has no best (or last) checkpoint to show."""
    if trainer.fast_dev_run:
        return "fast_dev_run saves no checkpoints"
    if best_cb is None:
        return f"no checkpoint callback monitors {metric}"
    return f"{metric} was never logged" if best_cb.best_model_score is None else "none was written"


def _print_summary(summary: dict[str, Any], why_none: str = "") -> None:
    """The end-of-run lines: checkpoints, scores rounded to 4 digits, and where the rest is."""
    final, metric, run_dir = summary["final"], summary["optimized_metric"], Path(summary["run_dir"])
    val = "  ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith("val/")) or "none (no validation ran)"
    score = summary["best_score"]
    if summary["best_checkpoint"]:
        best = f"{summary['best_checkpoint']} ({metric}={'none' if score is None else f'{score:.4f}'})"
    else:
        best = f"none ({why_none})"
    last = summary["last_checkpoint"] or (f"none ({why_none})" if why_none.startswith("fast_dev_run") else "none")
    lines = [
        f"run dir:         {run_dir}",
        f"best checkpoint: {best}",
        f"last checkpoint: {last}",
        f"final val:       {val}",
    ]
    if "threshold" in summary:
        t = summary["threshold"]
        line = f"threshold:       {t['value']:.2f} (maximises val F1: {t['val_f1']:.4f}; stored in the checkpoints)"
        if "selection" in t:
            line = f"calibrated:      {t['selection']} (stored in the checkpoints)"
        lines.insert(3, line)
    if "test" in summary:
        label = "test (best):    " if summary["best_checkpoint"] else "test (final):   "
        lines.append(f"{label} " + "  ".join(f"{k}={v:.4f}" for k, v in summary["test"].items()))
    logs = f", TensorBoard logs in {run_dir}" if (run_dir / "tensorboard").is_dir() else ""
    lines.append(f"metrics:         {run_dir / 'metrics.json'}{logs}")
    print("\n".join(lines), flush=True)


@hydra_app("train")
def main(cfg: DictConfig) -> float | None:
    """glint-train: train, checkpoint, resume, and test at the end."""
    return train(cfg)


if __name__ == "__main__":
    main()
