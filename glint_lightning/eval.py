"""`python -m glint_lightning.eval ckpt_path=run/checkpoints/best-epoch009.ckpt [data.test_path=...] [...]`

Builds the model and data from the config stored in the checkpoint (`data.*` overrides change paths, batch size,
workers), scores a split and prints and writes pixel metrics, glint (object) metrics and a precision-recall curve.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchmetrics.classification import BinaryPrecisionRecallCurve

from glint_lightning.errors import GlintError, exit_on_user_error
from glint_lightning.evaluation import ObjectCounts, calibrate_threshold, predictions, write_threshold
from glint_lightning.metrics import pixel_metrics
from glint_lightning.module import GlintModule
from glint_lightning.resume import load_checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,  # required
    "split": "test",  # test | val
    "threshold": None,  # null = the checkpoint's (calibrated) threshold
    "iou_threshold": 0.25,  # a predicted glint matches a true one when their IoU reaches this
    "calibrate": False,  # first pick the threshold maximising val F1 and store it in the checkpoint
    "device": "auto",  # auto | cpu | cuda
    "out": None,  # null = <run dir>/eval/<checkpoint name>-<split>/
}


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


def evaluate(args: Any, data_overrides: dict[str, Any]) -> dict[str, Any]:
    """Score one split of the checkpoint's data; returns the metrics and where they were written."""
    if not args.ckpt_path:
        raise GlintError(f"ckpt_path is not set; usage: {__doc__.strip().splitlines()[0]}")
    ckpt_path = Path(args.ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not config or "data" not in config:
        raise GlintError(f"{ckpt_path}: no data config stored; it was not written by glint_lightning.train")
    datamodule = instantiate(OmegaConf.merge(config["data"], data_overrides), _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("test")
    if not datamodule.has_split(args.split):
        raise GlintError(f"no {args.split} split in the stored data config; pass data.{args.split}_path=<file.h5>")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    module = GlintModule.from_checkpoint_dict(ckpt, map_location=device)
    result: dict[str, Any] = {"checkpoint": str(ckpt_path), "split": args.split}
    if args.calibrate:
        threshold, f1 = calibrate_threshold(module, datamodule.val_dataloader(), device)
        write_threshold(ckpt_path, threshold, f1)
        result["calibration"] = {"threshold": threshold, "val_f1": f1}
        module.set_threshold(threshold)
    threshold = float(module.hparams.threshold if args.threshold is None else args.threshold)
    loader = datamodule.test_dataloader() if args.split == "test" else datamodule.val_dataloader()
    metrics = pixel_metrics(args.split, threshold, module.hparams.ap_bins)
    curve = BinaryPrecisionRecallCurve(thresholds=module.hparams.ap_bins or 200)
    objects = ObjectCounts(args.iou_threshold)
    loss_sum, tiles = 0.0, 0
    for logits, mask, valid in predictions(module, loader, device):
        prob = torch.sigmoid(logits)
        metrics.update(prob[valid], mask[valid].int())
        curve.update(prob[valid], mask[valid].int())
        objects.update((mask.bool() & valid)[:, 0].numpy(), ((prob >= threshold) & valid)[:, 0].numpy())
        loss_sum += float(module.loss_fn(logits, mask, valid)) * len(prob)
        tiles += len(prob)
    result.update({k: float(v) for k, v in metrics.compute().items()})
    result[f"{args.split}/loss"] = loss_sum / max(tiles, 1)
    result.update(objects.compute())
    result.update({"threshold": threshold, "iou_threshold": args.iou_threshold, "tiles": tiles})
    out = Path(args.out) if args.out else ckpt_path.parent.parent / "eval" / f"{ckpt_path.stem}-{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([("metric", "value"), *((k, v) for k, v in result.items() if not isinstance(v, dict))])
    _plot_pr_curve(curve, threshold, out / "pr_curve.png", f"{ckpt_path.name} ({args.split}, {tiles} tiles)")
    result["out"] = str(out)
    return result


def main(argv: list[str]) -> None:
    cli = OmegaConf.from_dotlist(argv)
    data_overrides = cli.pop("data", None) or {}
    args = OmegaConf.merge(DEFAULTS, cli)
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise GlintError(f"eval: unknown option(s) {sorted(unknown)}; valid options are {sorted(DEFAULTS)} and data.*")
    result = evaluate(args, data_overrides)
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:{width}s} {value:.4f}")
    print(f"wrote {result['out']}/metrics.json, metrics.csv and pr_curve.png")


if __name__ == "__main__":
    with exit_on_user_error():
        main(sys.argv[1:])
