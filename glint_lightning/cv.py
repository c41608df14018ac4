"""`glint-cv dir=outputs/multirun/<date>/<time> [optimized_metric=iou|object_f1] [tta=none|flip|d4]`

Cross-validation over the fold runs of a multirun (`glint-train -m experiment=cv`: one job per `data.fold` of
`data.folds`). Each fold's best checkpoint predicts its own validation tiles, which it never trained on: together
the out-of-fold (OOF) probabilities of every training tile, each exactly once. On them it picks the threshold and
post-processing (min_size, fill_holes) maximising `optimized_metric` (pixel IoU, or glint-level F1), keeping
post-processing only when it beats none. It writes into the multirun folder

- `cv.json` and `cv.csv`: each fold's validation metrics at that choice, their mean and standard deviation, the
  OOF metrics, the choice itself, and the test scores below;
- `cv.ensemble.json`: the folds' best checkpoints with that threshold and post-processing, a file eval and predict
  take as `ckpt_path=` (their mean probability);

then, when the runs have a test split, scores the ensemble and each fold alone on it (with the same threshold,
post-processing and `tta`), and prints one table.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError

METRIC_COLUMNS = ("iou", "f1", "precision", "recall", "ap", "object_precision", "object_recall", "object_f1")
USAGE = "glint-cv dir=outputs/multirun/<date>/<time> (the multirun folder of glint-train -m experiment=cv)"


@dataclass
class FoldRun:
    """One job of the multirun: which fold it validated on, and its checkpoint."""

    fold: int
    folds: int
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)  # its validation tiles at the chosen threshold
    val_tiles: int = 0


def _fold_of(config_file: Path) -> tuple[int | None, int | None]:
    """(data.folds, data.fold) of a job's .hydra/config.yaml (None when not set)."""
    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
    values = []
    for key in ("folds", "fold"):
        value = data.get(key)
        try:
            values.append(None if value is None else int(value))
        except (TypeError, ValueError):
            raise GlintError(f"{config_file}: data.{key}={value!r} is not a whole number") from None
    return values[0], values[1]


def _checkpoint(run_dir: Path, which: str) -> Path:
    folder = run_dir / "checkpoints"
    if which == "last":
        if not (folder / "last.ckpt").is_file():
            raise GlintError(f"{run_dir}: no checkpoints/last.ckpt; did the run start?")
        return folder / "last.ckpt"
    found = sorted(folder.glob("best-*.ckpt"))
    if len(found) > 1:  # the one metrics.json names, when it names one of them
        named = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
        found = [p for p in found if p.name == Path(str(named.get("best_checkpoint"))).name] or found
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise GlintError(f"{run_dir}: {what} checkpoints/best-*.ckpt; did the run finish? (checkpoint=last takes last)")
    return found[0]


def find_fold_runs(sweep_dir: Path, which: str = "best") -> list[FoldRun]:
    """The fold runs of a multirun folder, by fold; refuses (one line) anything but one run per fold 0..K-1."""
    if which not in ("best", "last"):
        raise GlintError(f"checkpoint={which}; use best or last")
    config_files = sorted(sweep_dir.glob("*/.hydra/config.yaml"))
    if not config_files:
        raise GlintError(f"dir={sweep_dir}: no job folders with .hydra/config.yaml; pass {USAGE}")
    runs: list[tuple[Path, int, int]] = []
    for config_file in config_files:
        run_dir = config_file.parent.parent
        folds, fold = _fold_of(config_file)
        if folds is None or folds < 2 or fold is None:
            raise GlintError(
                f"{run_dir}: not a cross-validation fold run (data.folds={folds}, data.fold={fold}); pass {USAGE}"
            )
        runs.append((run_dir, folds, fold))
    ks = sorted({k for _, k, _ in runs})
    if len(ks) > 1:
        raise GlintError(f"dir={sweep_dir}: its runs split the data into different numbers of folds ({ks})")
    k = ks[0]
    count = Counter(fold for _, _, fold in runs)
    twice = {f: [r.name for r, _, g in runs if g == f] for f, n in sorted(count.items()) if n > 1}
    if twice:
        f, jobs = next(iter(twice.items()))
        raise GlintError(
            f"dir={sweep_dir}: fold {f} was run more than once (jobs {', '.join(jobs)}); keep one run per fold"
        )
    outside = sorted(f for f in count if not 0 <= f < k)
    missing = sorted(set(range(k)) - set(count))
    if outside or missing:
        what = f"fold {outside[0]} is outside 0..{k - 1}" if outside else f"fold(s) {missing} of {k} have no run"
        raise GlintError(f"dir={sweep_dir}: {what}; every fold 0..{k - 1} needs exactly one run")
    return [
        FoldRun(fold, k, run_dir, _checkpoint(run_dir, which)) for run_dir, _, fold in sorted(runs, key=lambda r: r[2])
    ]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def check_same_data(configs: Sequence[Mapping[str, Any]], runs: Sequence[FoldRun]) -> None:
    """The folds must partition the same tiles the same way: their data configs may differ in `fold` only."""
    first = {k: v for k, v in _flat(configs[0]).items() if k != "fold"}
    for config, run in zip(configs[1:], runs[1:]):
        other = {k: v for k, v in _flat(config).items() if k != "fold"}
        diff = sorted(key for key in set(first) | set(other) if first.get(key) != other.get(key))
        if diff:
            key = diff[0]
            raise GlintError(
                f"{run.run_dir}: its data.{key}={other.get(key)!r} differs from fold {runs[0].fold}'s "
                f"({first.get(key)!r}); the folds of one cross-validation share every data setting but data.fold"
            )


def check_coverage(val_indices: Sequence[np.ndarray], pools: Sequence[np.ndarray | None]) -> int:
    """Each tile of the training pool in exactly one fold's validation split; returns the pool size.

    val_indices: each fold's validation tile indices; pools: each fold's train + validation indices (None when
    not known): all the same set, which the validation splits partition."""
    allv = np.concatenate([np.asarray(v, dtype=np.int64) for v in val_indices])
    values, counts = np.unique(allv, return_counts=True)
    if (counts > 1).any():
        tile = int(values[counts > 1][0])
        folds = [f for f, v in enumerate(val_indices) if tile in set(np.asarray(v).tolist())]
        raise GlintError(
            f"tile {tile} is in the validation split of folds {folds}: out-of-fold predictions must cover each tile "
            f"exactly once ({int((counts > 1).sum())} tiles more than once)"
        )
    known = [np.unique(np.asarray(p, dtype=np.int64)) for p in pools if p is not None]
    for pool in known:
        if len(pool) != len(known[0]) or (pool != known[0]).any():
            raise GlintError("the folds do not share one training pool (train + validation tiles differ between folds)")
    if known:
        missing = np.setdiff1d(known[0], values)
        if len(missing) or len(values) != len(known[0]):
            raise GlintError(
                f"{len(missing)} of the {len(known[0])} training tiles are in no fold's validation split (e.g. tile "
                f"{int(missing[0]) if len(missing) else '?'}): out-of-fold predictions must cover each tile once"
            )
    return len(values)


def _mean_std(rows: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    mean, std = {}, {}
    for key in METRIC_COLUMNS:
        values = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        if len(values):
            mean[key] = float(values.mean())
            std[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def predict_folds(cfg: DictConfig, runs: list[FoldRun]) -> dict[str, Any]:
    """Out-of-fold predictions of every fold into one search over thresholds and post-processing; per-fold counts
    kept. Returns the searches, the OOF average precision, the pool size and fold 0's data module."""
    from hydra.utils import instantiate
    from torchmetrics.classification import BinaryAveragePrecision

    from glint_lightning.checkpoints.reader import load_checkpoint
    from glint_lightning.eval import given
    from glint_lightning.inference.calibration import PostprocessSearch
    from glint_lightning.module import GlintModule
    from glint_lightning.scoring import predict_loader
    from glint_lightning.utils.options import torch_device

    device = torch_device(cfg.device)
    overrides = given(OmegaConf.to_container(cfg.data)) if cfg.get("data") else {}
    searches, aps, val_indices, pools, configs, datamodules, ckpts = [], [], [], [], [], [], []
    oof_ap = BinaryAveragePrecision(thresholds=200)
    for run in runs:
        ckpt = load_checkpoint(run.checkpoint)  # weights_only, every stored `_target_` checked
        data_config = ((ckpt.get("hyper_parameters") or {}).get("config") or {}).get("data")
        if not data_config:
            raise GlintError(f"{run.checkpoint}: no data config stored; it was not written by glint_lightning.train")
        if data_config.get("fold") != run.fold or data_config.get("folds") != run.folds:
            raise GlintError(
                f"{run.checkpoint}: trained on fold {data_config.get('fold')} of {data_config.get('folds')}, but its "
                f"run says fold {run.fold} of {run.folds}"
            )
        configs.append(data_config)
        ckpts.append(ckpt)
        datamodule = instantiate(OmegaConf.merge(data_config, overrides), _convert_="all")
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodules.append(datamodule)
        val = datamodule.datasets["val"]
        val_indices.append(np.asarray(val.indices))
        train_ds = datamodule.datasets.get("train")
        train_idx = getattr(train_ds, "indices", None)
        pools.append(None if train_idx is None else np.concatenate([np.asarray(train_idx), val_indices[-1]]))
    check_same_data(configs, runs)
    pool = check_coverage(val_indices, pools)

    for run, datamodule, indices, ckpt in zip(runs, datamodules, val_indices, ckpts):
        module = GlintModule.from_checkpoint_dict(ckpt, device)
        search = PostprocessSearch(iou_threshold=float(cfg.iou_threshold))
        ap = BinaryAveragePrecision(thresholds=200)
        n = 0
        for prob, mask, valid in predict_loader(module, datamodule.eval_loader("val", shard=False), device, cfg.tta):
            search.update(prob, mask, valid)
            for metric in (ap, oof_ap):
                metric.update(prob[valid], mask[valid].int())
            n += prob.shape[0]
        if n != len(indices):
            raise GlintError(f"fold {run.fold}: its val loader gave {n} tiles, not the {len(indices)} of its split")
        run.val_tiles = n
        searches.append(search)
        aps.append(float(ap.compute()))
        print(f"fold {run.fold}: predicted its {n} validation tiles with {run.checkpoint.name}", flush=True)
    return {
        "searches": searches,
        "aps": aps,
        "oof_ap": float(oof_ap.compute()),
        "pool": pool,
        "datamodule": datamodules[0],
    }


def score_test(cfg: DictConfig, runs: list[FoldRun], ensemble: Path, selection: Any, sweep_dir: Path) -> dict[str, Any]:
    """The ensemble and each fold's checkpoint alone on the test split, with the chosen threshold and
    post-processing (eval's test loop; reports under <dir>/cv-test/)."""
    from glint_lightning.eval import evaluate

    rows = {}
    for name, path in [("ensemble", ensemble), *((f"fold {r.fold}", r.checkpoint) for r in runs)]:
        eval_cfg = OmegaConf.create(
            {
                "ckpt_path": str(path),
                "split": "test",
                "threshold": selection.threshold,
                "tta": cfg.tta,
                "iou_threshold": float(cfg.iou_threshold),
                "calibrate": False,
                "device": cfg.device,
                "out": str(sweep_dir / "cv-test" / name.replace(" ", "")),
                "data": OmegaConf.to_container(cfg.data) if cfg.get("data") else {},
                "postprocess": selection.postprocess.as_dict(),
            }
        )
        result = evaluate(eval_cfg)
        rows[name] = {"tiles": result["tiles"], "file": result["file"]}
        rows[name].update({k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("test/")})
    return rows


def cross_validate(cfg: DictConfig) -> dict[str, Any]:
    """Everything glint-cv does; returns what cv.json holds."""
    from glint_lightning.inference.calibration import check_optimized_metric
    from glint_lightning.inference.ensemble import write_ensemble

    if not cfg.dir:
        raise GlintError(f"dir is not set; usage: {USAGE}")
    sweep_dir = Path(str(cfg.dir))
    if not sweep_dir.is_dir():
        raise GlintError(f"dir={sweep_dir}: no such folder; pass {USAGE}")
    check_optimized_metric(cfg.optimized_metric)
    runs = find_fold_runs(sweep_dir, cfg.checkpoint)
    predicted = predict_folds(cfg, runs)
    searches = predicted["searches"]
    total = searches[0]
    for search in searches[1:]:
        total = total.merge(search)
    selection = total.select(cfg.optimized_metric)
    for run, search, ap in zip(runs, searches, predicted["aps"]):
        run.metrics = {**search.metrics_at(selection.threshold, selection.postprocess), "ap": ap}
    mean, std = _mean_std([r.metrics for r in runs])
    oof = {**selection.metrics, "ap": predicted["oof_ap"]}

    ensemble = Path(cfg.ensemble) if cfg.get("ensemble") else sweep_dir / "cv.ensemble.json"
    info = {
        "made_by": "glint-cv",
        "dir": str(sweep_dir),
        "folds": len(runs),
        "optimized_metric": cfg.optimized_metric,
        "tta": cfg.tta,
        "selection": selection.record(),
        "oof": {k: oof[k] for k in METRIC_COLUMNS},
    }
    write_ensemble(ensemble, [r.checkpoint for r in runs], selection.threshold, selection.postprocess, info)
    datamodule = predicted["datamodule"]
    test = None
    if cfg.test and datamodule.has_split("test"):
        test = score_test(cfg, runs, ensemble, selection, sweep_dir)
    summary = {
        "dir": str(sweep_dir),
        "folds": len(runs),
        "checkpoint": cfg.checkpoint,
        "optimized_metric": cfg.optimized_metric,
        "tta": cfg.tta,
        "iou_threshold": float(cfg.iou_threshold),
        "runs": [
            {"fold": r.fold, "run_dir": str(r.run_dir), "checkpoint": str(r.checkpoint), "val_tiles": r.val_tiles}
            | {"metrics": r.metrics}
            for r in runs
        ],
        "val_mean": mean,
        "val_std": std,
        "oof": {"tiles": predicted["pool"], "each_once": True, "metrics": oof},
        "threshold": selection.threshold,
        "postprocess": selection.postprocess.as_dict(),
        "selection": {**selection.record(), "threshold": selection.threshold, "text": selection.describe()},
        "ensemble": str(ensemble),
        "test": test,
    }
    (sweep_dir / "cv.json").write_text(json.dumps(summary, indent=1) + "\n")
    _write_csv(sweep_dir / "cv.csv", table_rows(summary))
    return summary


def table_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of cv.csv and of the printed table."""
    rows = [{"row": f"val fold {r['fold']}", "tiles": r["val_tiles"], **r["metrics"]} for r in summary["runs"]]
    rows.append({"row": "val mean", **summary["val_mean"]})
    rows.append({"row": "val std", **summary["val_std"]})
    rows.append({"row": "out-of-fold", "tiles": summary["oof"]["tiles"], **summary["oof"]["metrics"]})
    for name, metrics in (summary.get("test") or {}).items():
        rows.append({"row": f"test {name}", **metrics})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["row", "tiles", *METRIC_COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def format_table(summary: Mapping[str, Any]) -> str:
    """The printed summary: what was chosen, then one row per fold, mean, std, OOF and test scores."""
    from glint_lightning.inference.postprocess import PostProcess

    post = summary["postprocess"]
    lines = [
        f"cross-validation: {summary['folds']} folds in {summary['dir']} ({summary['checkpoint']} checkpoints, "
        f"tta {summary['tta']})",
        f"out-of-fold:      {summary['oof']['tiles']} tiles, each predicted once, by the fold that did not train on it",
        f"chosen on them:   {summary['selection']['text']}",
    ]
    if summary.get("test"):
        chosen = f"threshold {summary['threshold']:.2f} and post-processing {PostProcess.from_dict(post).describe()}"
        lines.append(f"test:             {next(iter(summary['test'].values()))['file']}, every row with {chosen}")
    lines.append("")
    width = max(len(r["row"]) for r in table_rows(summary))
    header = f"{'':{width}s} {'tiles':>6s} " + " ".join(f"{c:>{max(len(c), 6)}s}" for c in METRIC_COLUMNS)
    lines.append(header)
    for row in table_rows(summary):
        tiles = f"{row['tiles']:>6d}" if isinstance(row.get("tiles"), int) else f"{'':>6s}"
        cells = " ".join(f"{row[c]:>{max(len(c), 6)}.4f}" if c in row else " " * max(len(c), 6) for c in METRIC_COLUMNS)
        lines.append(f"{row['row']:{width}s} {tiles} {cells}")
    lines.append("")
    lines.append(f"wrote {summary['dir']}/cv.json, cv.csv and {summary['ensemble']}")
    return "\n".join(lines)


@hydra_app("cv")
def main(cfg: DictConfig) -> dict[str, Any]:
    """glint-cv: out-of-fold scores, threshold and post-processing chosen on them, and the folds' ensemble."""
    summary = cross_validate(cfg)
    print(format_table(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
