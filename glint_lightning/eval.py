"""`glint-eval ckpt_path=run/checkpoints/best-epoch009.ckpt [split=test|val|train] [data.test_path=...] [...]`

Builds the model and data from the config stored in the checkpoint, with the given `data.*` overrides merged over
it, scores one split through the scoring path of train's validation and test steps (glint_lightning.scoring: the
same loss, metrics and glint matching, so also the same numbers), and prints and writes pixel metrics, glint
(object) metrics and a precision-recall curve.
`ckpt_path` may be an ensemble file from glint-cv (`<name>.ensemble.json`: its members' mean probability); the
thresholded masks are post-processed (`postprocess.*`, else what the checkpoint or ensemble file records) before
the pixel and glint metrics score them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryPrecisionRecallCurve

from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.data import GlintDataModule
from glint_lightning.inference.calibration import calibrate_postprocess, write_threshold
from glint_lightning.inference.ensemble import Ensemble, is_ensemble_file, load_ensemble
from glint_lightning.inference.loading import checkpoint_postprocess
from glint_lightning.inference.postprocess import PostProcess, resolve_postprocess
from glint_lightning.metrics import OBJECT_METRICS, ObjectMetric, pixel_metrics
from glint_lightning.module import GlintModule
from glint_lightning.scoring import score_batch, tta_transforms
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.options import torch_device

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLITS = ("test", "val", "train")
USAGE = (
    "glint-eval ckpt_path=<file.ckpt or .ensemble.json> [split=test|val|train] [data.test_path=<file.h5>] "
    "(--help for all options)"
)


def given(overrides: Any) -> Any:
    """The non-null leaves of a nested mapping (null in conf/eval.yaml means "as stored in the checkpoint")."""
    if not isinstance(overrides, Mapping):
        return overrides
    kept = {k: given(v) for k, v in overrides.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {}}


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
    return ds.label, len(ds), f"{len(ds)} tiles of {ds.label}{part}"


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
    if is_ensemble_file(ckpt_path):  # <folder>/cv.ensemble.json -> <folder>/eval/cv-<split>
        name = f"{ckpt_path.name.removesuffix('.ensemble.json')}-{split}"
    if data_overrides.get(f"{split}_path"):
        name += f"-{Path(data_overrides[f'{split}_path']).stem}"
    return (ckpt_path.parent if is_ensemble_file(ckpt_path) else ckpt_path.parent.parent) / "eval" / name


def load_scored(
    ckpt_path: Path, split: str, overrides: Mapping[str, Any]
) -> tuple[GlintModule | Ensemble, dict[str, Any], PostProcess]:
    """(module, the stored run config its data comes from, the stored post-processing) of a checkpoint or an
    ensemble file. An ensemble's data config is its first member's; members trained on different data (the
    folds of a cross-validation) share only the test split, unless a file is given for the split."""
    if is_ensemble_file(ckpt_path):
        module = load_ensemble(ckpt_path)
        config = module.configs[0]
        differ = any(_data_without_fold(c) != _data_without_fold(config) for c in module.configs[1:])
        folds = any(c.get("data", {}) != config.get("data", {}) for c in module.configs[1:])
        if (differ or folds) and split != "test" and not overrides.get(f"{split}_path"):
            raise GlintError(
                f"{ckpt_path}: its members were trained on different {split} tiles (cross-validation folds), so "
                f"split={split} would score tiles some members trained on; use split=test or data.{split}_path=<file>"
            )
        if differ:
            print(f"note: {ckpt_path}: its members' data configs differ; scoring with the first member's", flush=True)
        return module, config, module.postprocess
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt.get("hyper_parameters", {}).get("config")
    return GlintModule.from_checkpoint_dict(ckpt), config, checkpoint_postprocess(ckpt, str(ckpt_path))


def _data_without_fold(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (config.get("data") or {}).items() if k != "fold"}


@torch.no_grad()
def score_split(
    module: GlintModule | Ensemble,
    loader: DataLoader,
    device: str,
    split: str,
    threshold: float,
    tta: str = "none",
    iou_threshold: float = 0.25,
    post: PostProcess | None = None,
) -> tuple[dict[str, float], BinaryPrecisionRecallCurve]:
    """`<split>/loss`, the pixel and glint metrics and the glint counts of every tile of `loader`, and the
    precision-recall curve: each batch through scoring.score_batch, as train's test step scores it."""
    tta_transforms(tta)  # refuses an unknown name before any tile is scored
    settings = module if isinstance(module, Ensemble) else module.hparams
    pixels = pixel_metrics(split, threshold, settings.ap_bins).to(device)
    objects = ObjectMetric(threshold, iou_threshold).to(device)
    curve = BinaryPrecisionRecallCurve(thresholds=settings.ap_bins or 200)
    postprocess = post.apply if post is not None and post.active else None
    module.eval().to(device)
    loss_sum, tiles = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k in ("depth", "mask", "valid")}
        loss, _, prob = score_batch(module, batch, module.loss_fn, threshold, pixels, objects, tta, postprocess)
        n = batch["depth"].shape[0]
        loss_sum, tiles = loss_sum + float(loss) * n, tiles + n  # the batch-size-weighted mean Lightning logs
        valid = batch["valid"]
        curve.update(prob[valid].cpu(), batch["mask"][valid].int().cpu())
    values = objects.compute()
    scores = {f"{split}/loss": loss_sum / max(tiles, 1), **{k: float(v) for k, v in pixels.compute().items()}}
    scores = dict(sorted({**scores, **{f"{split}/object_{k}": float(values[k]) for k in OBJECT_METRICS}}.items()))
    scores.update({f"{split}/object_{k}": int(values[k]) for k in ("true", "predicted", "matched")})
    return scores, curve


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score one split of the checkpoint's data; returns the metrics, what was scored and where they were written."""
    if not cfg.ckpt_path:
        raise GlintError(f"ckpt_path is not set; usage: {USAGE}")
    if cfg.split not in SPLITS:
        raise GlintError(f"split={cfg.split}; use split=test, split=val or split=train")
    ckpt_path = Path(cfg.ckpt_path)
    overrides = given(OmegaConf.to_container(cfg.data))
    module, config, stored_post = load_scored(ckpt_path, cfg.split, overrides)
    if not config or "data" not in config:
        raise GlintError(f"{ckpt_path}: no data config stored; it was not written by glint_lightning.train")
    datamodule = build_data(config, overrides, cfg.split)
    device = torch_device(cfg.device)
    result: dict[str, Any] = {"checkpoint": str(ckpt_path), "split": cfg.split}
    if cfg.calibrate:
        if isinstance(module, Ensemble):
            raise GlintError(
                f"calibrate=true: {ckpt_path}'s threshold and post-processing were chosen by glint-cv on the "
                "out-of-fold predictions; run glint-cv again to choose them anew"
            )
        datamodule.setup_split("val")
        metric = cfg.get("optimized_metric") or "iou"
        cal = calibrate_postprocess(
            module, datamodule.eval_loader("val", shard=False), device, metric, float(cfg.iou_threshold)
        )
        write_threshold(ckpt_path, cal.threshold, cal.val_f1, postprocess=cal.selection.record())
        result["calibration"] = {
            "threshold": cal.threshold,
            "val_f1": cal.val_f1,
            "file": _tiles(datamodule, "val")[0],
            "postprocess": cal.selection.record(),
            "selection": cal.selection.describe(),
        }
        module.set_threshold(cal.threshold)
        stored_post = cal.selection.postprocess
    stored = module.threshold if isinstance(module, Ensemble) else module.hparams.threshold
    threshold = float(stored if cfg.threshold is None else cfg.threshold)
    post = resolve_postprocess(cfg.get("postprocess"), stored_post)
    file, tiles, scored = _tiles(datamodule, cfg.split)
    result.update(
        {"file": file, "tiles": tiles, "threshold": threshold, "iou_threshold": cfg.iou_threshold, "tta": cfg.tta}
    )
    result["postprocess"] = {**post.as_dict(), "source": "stored" if post == stored_post else "given"}
    loader = datamodule.eval_loader(cfg.split, shard=False)
    scores, curve = score_split(module, loader, device, cfg.split, threshold, cfg.tta, float(cfg.iou_threshold), post)
    result.update(scores)

    out = Path(cfg.out) if cfg.out else default_out(ckpt_path, cfg.split, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([("metric", "value"), *((k, v) for k, v in result.items() if not isinstance(v, dict))])
    _plot_pr_curve(curve, threshold, out / "pr_curve.png", f"{ckpt_path.name} ({cfg.split}, {tiles} tiles)")
    result["out"] = str(out)
    result["scored"] = scored
    return result


def print_result(result: dict[str, Any]) -> None:
    """What was scored (file, tiles, threshold), each metric on a line, and where the reports are."""
    print(f"checkpoint: {result['checkpoint']}")
    if "calibration" in result:
        c = result["calibration"]
        if PostProcess.from_dict(c["postprocess"]).active or c["postprocess"]["metric"] != "iou":
            print(f"calibrated: {c['selection']} of {c['file']}")
        else:
            print(f"calibrated: threshold {c['threshold']:.4f} maximises val F1 ({c['val_f1']:.4f}) on {c['file']}")
            print(f"            {c['selection'].split(', ', 1)[1]}")
    print(f"scored:     {result['split']} split, {result['scored']}")
    print(f"threshold:  {result['threshold']:.4f} (pixels); glints match at IoU >= {result['iou_threshold']}")
    print(f"tta:        {result['tta']}")
    post = PostProcess.from_dict(result["postprocess"])
    source = {"stored": " (as stored)", "given": " (given)"}[result["postprocess"]["source"]] if post.active else ""
    print(f"post:       {post.describe()}{source}")
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
