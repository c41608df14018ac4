"""`glint-eval ckpt_path=run/checkpoints/best-epoch009.ckpt [split=test|val|train] [data.test_path=...] [...]`

Builds the model and data from the config stored in the checkpoint, with the given `data.*` overrides merged over
it, scores one split through Lightning's test loop (the same `test_step` and metrics as train's test stage, so
also the same numbers), and prints and writes pixel metrics, glint (object) metrics and a precision-recall curve.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import BinaryPrecisionRecallCurve

from glint_lightning.checkpoints.resume import load_checkpoint
from glint_lightning.data import GlintDataModule
from glint_lightning.inference.calibration import calibrate_threshold, write_threshold
from glint_lightning.module import GlintModule
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLITS = ("test", "val", "train")
USAGE = "glint-eval ckpt_path=<file.ckpt> [split=test|val|train] [data.test_path=<file.h5>] (--help for all options)"


class CurveCollector(L.Callback):
    """The precision-recall curve over the valid pixels the test loop scores (from test_step's logits)."""

    def __init__(self, bins: int) -> None:
        self.curve = BinaryPrecisionRecallCurve(thresholds=bins)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        valid = batch["valid"]
        self.curve.update(torch.sigmoid(outputs["logits"])[valid].float().cpu(), batch["mask"][valid].int().cpu())


def given(overrides: Any) -> Any:
    """The non-null leaves of a nested mapping (null in conf/eval.yaml means "as stored in the checkpoint")."""
    if not isinstance(overrides, Mapping):
        return overrides
    kept = {k: given(v) for k, v in overrides.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {}}


def torch_device(device: str) -> str:
    """`device` as torch names it; auto = the GPU when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise GlintError(f"device={device} but no CUDA GPU is available here; use device=cpu (or auto)")
        return device
    raise GlintError(f"device={device}; use auto, cpu, cuda or cuda:<index>")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's start-up lines (devices found) and its advice on loader workers (the user chose them)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quiet_trainer(device: str, callbacks: list[L.Callback]) -> L.Trainer:
    """One device, no logger, no checkpoints, no progress bar or model summary: nothing written, nothing printed."""
    accelerator, devices = ("cpu", 1) if device == "cpu" else ("gpu", [int(device[5:])] if ":" in device else 1)
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def build_data(config: Mapping[str, Any], overrides: Mapping[str, Any], split: str) -> GlintDataModule:
    """The checkpoint's data config with the given overrides, with `split` (and nothing it does not need) open."""
    datamodule = instantiate(OmegaConf.merge(config["data"], overrides), _convert_="all")
    datamodule.setup_split(split)
    if not datamodule.has_split(split):
        raise GlintError(f"no {split} split in the stored data config; pass data.{split}_path=<file.h5>")
    return datamodule


def _tiles(datamodule: GlintDataModule, split: str) -> tuple[str, int, str]:
    """(file, tiles scored, phrase saying so) for a split."""
    ds = datamodule.datasets[split]
    part = "" if len(ds) == ds.info.n else f" (of its {ds.info.n}; the rest are other splits)"
    return ds.info.path, len(ds), f"{len(ds)} tiles of {ds.info.path}{part}"


def _plot_pr_curve(curve: BinaryPrecisionRecallCurve, threshold: float, path: Path, title: str) -> None:
    precision, recall, thresholds = curve.compute()
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.plot(recall.numpy(), precision.numpy(), lw=2)
    i = int(torch.argmin((thresholds - threshold).abs()))
    ax.plot([recall[i]], [precision[i]], "o", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def default_out(ckpt_path: Path, split: str, data_overrides: Mapping[str, Any]) -> Path:
    """<run dir>/eval/<checkpoint>-<split>, plus the file's name when data.<split>_path chose another file."""
    name = f"{ckpt_path.stem}-{split}"
    if data_overrides.get(f"{split}_path"):
        name += f"-{Path(data_overrides[f'{split}_path']).stem}"
    return ckpt_path.parent.parent / "eval" / name


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score one split of the checkpoint's data; returns the metrics, what was scored and where they were written."""
    if not cfg.ckpt_path:
        raise GlintError(f"ckpt_path is not set; usage: {USAGE}")
    if cfg.split not in SPLITS:
        raise GlintError(f"split={cfg.split}; use split=test, split=val or split=train")
    ckpt_path = Path(cfg.ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not config or "data" not in config:
        raise GlintError(f"{ckpt_path}: no data config stored; it was not written by glint_lightning.train")
    overrides = given(OmegaConf.to_container(cfg.data))
    datamodule = build_data(config, overrides, cfg.split)
    device = torch_device(cfg.device)
    module = GlintModule.from_checkpoint_dict(ckpt)
    result: dict[str, Any] = {"checkpoint": str(ckpt_path), "split": cfg.split}
    if cfg.calibrate:
        datamodule.setup_split("val")
        threshold, f1 = calibrate_threshold(module, datamodule.eval_loader("val", shard=False), device)
        write_threshold(ckpt_path, threshold, f1)
        result["calibration"] = {"threshold": threshold, "val_f1": f1, "file": _tiles(datamodule, "val")[0]}
        module.set_threshold(threshold)
    if cfg.threshold is not None:
        module.set_threshold(float(cfg.threshold))
    threshold = float(module.hparams.threshold)
    module.set_test_label(cfg.split)
    module.set_test_tta(cfg.tta)
    module.test_objects.iou_threshold = float(cfg.iou_threshold)
    file, tiles, scored = _tiles(datamodule, cfg.split)
    result.update(
        {"file": file, "tiles": tiles, "threshold": threshold, "iou_threshold": cfg.iou_threshold, "tta": cfg.tta}
    )

    curve = CurveCollector(module.hparams.ap_bins or 200)
    with quiet_lightning():
        trainer = quiet_trainer(device, [curve])
        logged = trainer.test(module, dataloaders=datamodule.eval_loader(cfg.split), verbose=False)[0]
    result.update({k: float(v) for k, v in sorted(logged.items())})
    counts = module.test_objects.compute()
    result.update({f"{cfg.split}/object_{k}": int(counts[k]) for k in ("true", "predicted", "matched")})

    out = Path(cfg.out) if cfg.out else default_out(ckpt_path, cfg.split, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([("metric", "value"), *((k, v) for k, v in result.items() if not isinstance(v, dict))])
    _plot_pr_curve(curve.curve, threshold, out / "pr_curve.png", f"{ckpt_path.name} ({cfg.split}, {tiles} tiles)")
    result["out"] = str(out)
    result["scored"] = scored
    return result


def print_result(result: dict[str, Any]) -> None:
    """What was scored (file, tiles, threshold), each metric on a line, and where the reports are."""
    print(f"checkpoint: {result['checkpoint']}")
    if "calibration" in result:
        c = result["calibration"]
        print(f"calibrated: threshold {c['threshold']:.4f} maximises val F1 ({c['val_f1']:.4f}) on {c['file']}")
    print(f"scored:     {result['split']} split, {result['scored']}")
    print(f"threshold:  {result['threshold']:.4f} (pixels); glints match at IoU >= {result['iou_threshold']}")
    print(f"tta:        {result['tta']}")
    metrics = {k: v for k, v in result.items() if k.startswith(f"{result['split']}/")}
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:{width}s} {value:.4f}" if isinstance(value, float) else f"{key:{width}s} {value}")
    print(f"wrote {result['out']}/metrics.json, metrics.csv and pr_curve.png", flush=True)


@hydra_app("eval")
def main(cfg: DictConfig) -> dict[str, Any]:
    """glint-eval: score one split of a checkpoint's data (pixel and glint metrics, precision-recall curve)."""
    result = evaluate(cfg)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
