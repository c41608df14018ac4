"""Ensemble files through eval and predict, post-processing stored by calibration, and glint-cv (cross-validation
over the fold runs of a multirun)."""

from __future__ import annotations

import csv
import inspect
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import ndimage
from torchmetrics.classification import BinaryAveragePrecision

from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.ckpt_info import describe, format_info
from glint_lightning.cv import check_coverage, cross_validate, find_fold_runs, format_table
from glint_lightning.data import GlintDataModule
from glint_lightning.eval import build_data, evaluate
from glint_lightning.inference.calibration import write_threshold
from glint_lightning.inference.ensemble import Ensemble, read_ensemble, write_ensemble
from glint_lightning.inference.loading import load_module
from glint_lightning.inference.postprocess import PostProcess
from glint_lightning.metrics import EIGHT_CONNECTED, ObjectMetric
from glint_lightning.module import GlintModule
from glint_lightning.predict import predict_file
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import TINY, pointwise_module, run_cli


def _cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def pair(trained_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path]:
    """Two tiny checkpoints trained with different seeds (the session's and one more)."""
    from glint_lightning.train import train

    run = tmp_path_factory.mktemp("second")
    fixed = [f"paths.output_dir={run}", f"paths.outputs_root={run}", f"paths.cache_dir={cache_dir}"]
    train(_cfg("train", *TINY, *fixed, "trainer.max_epochs=1", "test=false", "seed=1"))
    return trained_ckpt, run / "checkpoints" / "last.ckpt"


def _frames(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["frames"] = np.random.default_rng(3).uniform(600, 1400, (1, 40, 52)).astype(np.float32)
    return path


def _predict(ckpt: Path, frames: Path, out: Path, *extra: str) -> tuple[np.ndarray, np.ndarray, dict]:
    predict_file(_cfg("predict", f"ckpt_path={ckpt}", f"input={frames}", f"output={out}", "device=cpu", *extra))
    with h5py.File(out) as f:
        return f["prob"][0].astype(np.float32), f["mask"][0], dict(f.attrs)


def test_an_ensemble_file_round_trips_through_eval_and_predict(pair, tmp_path):
    folder = tmp_path / "cv"
    ens = write_ensemble(folder / "pair.ensemble.json", pair, 0.4, PostProcess(2, False), {"made_by": "test"})
    stored = json.loads(ens.read_text())
    assert not any(Path(m).is_absolute() for m in stored["members"]), "members are stored relative to the file"
    spec = read_ensemble(ens)
    assert [p.resolve() for p in spec.members] == [p.resolve() for p in pair]
    assert (spec.threshold, spec.postprocess, spec.info) == (0.4, PostProcess(2, False), {"made_by": "test"})

    module = load_module(ens)
    assert isinstance(module, Ensemble) and module.threshold == 0.4
    depth = torch.rand(2, 1, 32, 32) * 800 + 600
    valid = torch.rand(2, 1, 32, 32) > 0.1
    members = [GlintModule.from_checkpoint(str(p)) for p in pair]
    with torch.no_grad():
        expected = sum(torch.sigmoid(m(depth, valid)) for m in members) / 2
        assert torch.allclose(torch.sigmoid(module(depth, valid)), expected, atol=1e-5)

    result = evaluate(_cfg("eval", f"ckpt_path={ens}", "device=cpu", "tta=flip"))  # TTA over the ensemble
    assert result["threshold"] == 0.4 and result["tiles"] == 16 and result["tta"] == "flip"
    assert result["postprocess"] == {"min_size": 2, "fill_holes": False, "source": "stored"}
    assert 0 <= result["test/iou"] <= 1 and Path(result["out"]) == folder / "eval" / "pair-test"

    frames = _frames(tmp_path / "frames.h5")
    off = ("mode=full", "tta=flip", "postprocess.min_size=0")
    p0, _, _ = _predict(pair[0], frames, tmp_path / "a.h5", *off)
    p1, _, _ = _predict(pair[1], frames, tmp_path / "b.h5", *off)
    prob, mask, attrs = _predict(ens, frames, tmp_path / "ens.h5", "mode=full", "tta=flip")
    assert np.abs(prob - (p0 + p1) / 2).max() < 2e-3, "the ensemble predicts its members' mean probability"
    assert attrs["threshold"] == 0.4 and attrs["min_size"] == 2 and not attrs["fill_holes"]
    labels, n = ndimage.label(mask, EIGHT_CONNECTED)
    assert n == 0 or np.bincount(labels.ravel())[1:].min() >= 2, "no glint under min_size is left"
    assert not (mask.astype(bool) & (prob < 0.39)).any()


def test_every_ensemble_member_is_checked_like_a_checkpoint(pair, tmp_path):
    evil = tmp_path / "evil.ckpt"
    ckpt = torch.load(pair[1], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["optimizer"]["_target_"] = "evil.payload"
    torch.save(ckpt, evil)
    ens = write_ensemble(tmp_path / "e.ensemble.json", [pair[0], evil], 0.5)
    with pytest.raises(GlintError, match=r"evil.ckpt: hyper_parameters.optimizer._target_=evil.payload is not a trust"):
        load_module(ens)
    with pytest.raises(GlintError, match="is not a trusted target"):
        evaluate(_cfg("eval", f"ckpt_path={ens}", "device=cpu"))
    gone = tmp_path / "gone.ensemble.json"
    gone.write_text(json.dumps({**json.loads(ens.read_text()), "members": ["missing.ckpt"]}))
    with pytest.raises(GlintError, match="member missing.ckpt .*: no such file"):
        load_module(gone)
    bad = tmp_path / "bad.ensemble.json"
    bad.write_text(json.dumps({**json.loads(ens.read_text()), "threshold": 2}))
    with pytest.raises(GlintError, match='"threshold" is 2'):
        read_ensemble(bad)


def test_an_ensemble_of_folds_is_scored_on_the_test_split_only(pair, tmp_path):
    folds = []
    for i, path in enumerate(pair):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["hyper_parameters"]["config"]["data"].update(folds=2, fold=i)
        torch.save(ckpt, tmp_path / f"fold{i}.ckpt")
        folds.append(tmp_path / f"fold{i}.ckpt")
    ens = write_ensemble(tmp_path / "folds.ensemble.json", folds, 0.5)
    with pytest.raises(GlintError, match="trained on different val tiles .* use split=test"):
        evaluate(_cfg("eval", f"ckpt_path={ens}", "device=cpu", "split=val"))
    with pytest.raises(GlintError, match="calibrate=true: .*chosen by glint-cv"):
        evaluate(_cfg("eval", f"ckpt_path={ens}", "device=cpu", "calibrate=true"))


def test_calibration_stores_post_processing_which_eval_and_predict_then_use(trained_ckpt, tmp_path):
    ckpt = tmp_path / "own.ckpt"
    shutil.copy(trained_ckpt, ckpt)
    result = evaluate(_cfg("eval", f"ckpt_path={ckpt}", "device=cpu", "calibrate=true", f"out={tmp_path / 'a'}"))
    record = load_checkpoint(ckpt)["threshold_calibration"]
    assert record["threshold"] == result["threshold"]
    assert {"min_size", "fill_holes", "metric", "score", "score_without", "tiles"} <= set(record["postprocess"])
    assert result["calibration"]["postprocess"] == record["postprocess"]
    line = next(ln for ln in format_info(describe(ckpt)).splitlines() if ln.startswith("post-processing:"))
    assert "val tiles" in line and describe(ckpt)["postprocess"] == record["postprocess"]

    write_threshold(ckpt, 0.3, 0.5, postprocess={"min_size": 3, "fill_holes": True})
    assert "min_size=3 px, fill_holes" in format_info(describe(ckpt))
    stored = evaluate(_cfg("eval", f"ckpt_path={ckpt}", "device=cpu", f"out={tmp_path / 'b'}"))
    assert stored["postprocess"] == {"min_size": 3, "fill_holes": True, "source": "stored"}
    given = evaluate(_cfg("eval", f"ckpt_path={ckpt}", "device=cpu", "postprocess.min_size=0", f"out={tmp_path}/c"))
    assert given["postprocess"] == {"min_size": 0, "fill_holes": True, "source": "given"}
    _, _, attrs = _predict(ckpt, _frames(tmp_path / "frames.h5"), tmp_path / "m.h5")
    assert attrs["min_size"] == 3 and attrs["fill_holes"]


def test_eval_scores_the_post_processed_masks(trained_ckpt, tmp_path):
    ckpt = load_checkpoint(trained_ckpt)
    module = GlintModule.from_checkpoint_dict(ckpt)
    datamodule = build_data(ckpt["hyper_parameters"]["config"], {}, "test")
    batches = list(datamodule.eval_loader("test"))
    with torch.no_grad():
        probs = [torch.sigmoid(module(b["depth"], b["valid"])) for b in batches]
    threshold = round(float(torch.quantile(torch.cat(probs).flatten(), 0.9)), 3)  # fragments to post-process
    post = PostProcess(3, True)
    tp = n_pred = n_true = 0
    objects, ap = ObjectMetric(threshold), BinaryAveragePrecision(thresholds=module.hparams.ap_bins)
    for prob, b in zip(probs, batches):
        valid, truth = b["valid"], b["mask"].bool() & b["valid"]
        pred = post.apply((prob >= threshold) & valid, valid)
        tp, n_pred, n_true = tp + (pred & truth).sum(), n_pred + pred.sum(), n_true + truth.sum()
        objects.update(pred.float(), b["mask"], valid)
        ap.update(prob[valid], b["mask"][valid].int())
    args = ("device=cpu", f"threshold={threshold}", f"out={tmp_path}")
    plain = evaluate(_cfg("eval", f"ckpt_path={trained_ckpt}", *args))
    post_args = ("postprocess.min_size=3", "postprocess.fill_holes=true")
    result = evaluate(_cfg("eval", f"ckpt_path={trained_ckpt}", *args, *post_args))
    assert result["test/iou"] == pytest.approx(float(tp / (n_pred + n_true - tp)), abs=1e-6)
    assert result["test/object_f1"] == pytest.approx(float(objects.compute()["f1"]), abs=1e-6)
    assert result["test/object_predicted"] == int(objects.compute()["predicted"])
    assert result["test/ap"] == pytest.approx(float(ap.compute()), abs=1e-6) == pytest.approx(plain["test/ap"])
    assert result["test/loss"] == pytest.approx(plain["test/loss"], abs=1e-6), "the loss scores probabilities"
    assert result["test/object_predicted"] != plain["test/object_predicted"], "the post-processing changed masks"


def _fake_run(sweep: Path, job: int, folds: int | None, fold: int | None) -> Path:
    run = sweep / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  folds: {json.dumps(folds)}\n  fold: {json.dumps(fold)}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / f"best-epoch00{job}.ckpt").write_bytes(b"")
    return run


def test_glint_cv_refuses_missing_or_repeated_folds_in_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    for job, fold in enumerate([2, 0, 1]):
        _fake_run(sweep, job, 3, fold)
    runs = find_fold_runs(sweep)
    assert [r.fold for r in runs] == [0, 1, 2] and runs[0].checkpoint.name == "best-epoch001.ckpt"
    _fake_run(sweep, 3, 3, 1)
    with pytest.raises(GlintError, match=r"fold 1 was run more than once \(jobs 2, 3\)"):
        find_fold_runs(sweep)
    shutil.rmtree(sweep / "3")
    shutil.rmtree(sweep / "0")
    with pytest.raises(GlintError, match=r"fold\(s\) \[2\] of 3 have no run"):
        find_fold_runs(sweep)
    _fake_run(sweep, 5, None, None)
    with pytest.raises(GlintError, match="5: not a cross-validation fold run"):
        find_fold_runs(sweep)
    with ThreadPoolExecutor(max_workers=2) as pool:  # side by side: each process is mostly its imports
        refused, res = pool.map(
            lambda args: run_cli("glint_lightning.cv", *args, cwd=tmp_path), [[f"dir={sweep}"], ["--help"]]
        )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "not a cross-validation fold run" in refused.stderr
    assert res.returncode == 0 and res.stdout.startswith("glint-cv: ")
    for key in _cfg("cv"):
        assert f"\n  {key}: " in res.stdout, f"--help does not name {key}"


def test_out_of_fold_coverage_must_be_exactly_once():
    pool = np.arange(10)
    vals = [np.array([0, 3, 6, 9]), np.array([1, 4, 7]), np.array([2, 5, 8])]
    pools = [np.setdiff1d(pool, v) for v in vals]
    assert check_coverage(vals, [np.concatenate([p, v]) for p, v in zip(pools, vals)]) == 10
    with pytest.raises(GlintError, match=r"tile 3 is in the validation split of folds \[0, 1\]"):
        check_coverage([vals[0], np.array([1, 3, 4, 7]), vals[2]], [None] * 3)
    with pytest.raises(GlintError, match="1 of the 10 training tiles are in no fold's validation split"):
        check_coverage(vals[:2] + [np.array([2, 5])], [pool] * 3)


FOLDS_READY = "folds" in inspect.signature(GlintDataModule).parameters


@pytest.mark.slow
@pytest.mark.skipif(not FOLDS_READY, reason="the data module has no data.folds yet")
def test_three_fold_cross_validation_end_to_end(tmp_path, cache_dir):
    env = {"GLINT_CACHE_DIR": str(cache_dir)}
    sweep = tmp_path / "sweep"
    args = [a for a in TINY if not a.startswith("trainer.max_epochs")]
    args += ["trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", f"paths.outputs_root={tmp_path}"]
    res = run_cli("glint_lightning.train", "-m", "experiment=cv", *args, cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # glint-cv and glint-eval in this process (their command lines are tested above and in test_evaluation.py)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("cv", overrides=[f"dir={sweep}", "device=cpu"])
    table = format_table(cross_validate(cfg))
    assert "out-of-fold:      48 tiles, each predicted once" in table and "test ensemble" in table

    summary = json.loads((sweep / "cv.json").read_text())
    assert summary["folds"] == 3 and summary["oof"] == {**summary["oof"], "tiles": 48, "each_once": True}
    vals = [json.loads((Path(r["run_dir"]) / "data.json").read_text())["val_indices"] for r in summary["runs"]]
    assert sorted(sum(vals, [])) == list(range(48)), "each training tile validated by exactly one fold"
    assert [r["val_tiles"] for r in summary["runs"]] == [len(v) for v in vals]
    for key in ("iou", "f1", "ap", "object_f1"):
        assert 0 <= summary["oof"]["metrics"][key] <= 1 and key in summary["val_mean"] and key in summary["val_std"]
    assert set(summary["test"]) == {"ensemble", "fold 0", "fold 1", "fold 2"}
    assert all(row["tiles"] == 16 for row in summary["test"].values())
    with open(sweep / "cv.csv") as f:
        rows = [r["row"] for r in csv.DictReader(f)]
    assert rows[:6] == ["val fold 0", "val fold 1", "val fold 2", "val mean", "val std", "out-of-fold"]

    spec = read_ensemble(sweep / "cv.ensemble.json")
    assert len(spec.members) == 3 and spec.threshold == summary["threshold"]
    assert spec.postprocess.as_dict() == summary["postprocess"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={sweep / 'cv.ensemble.json'}", "tta=flip", "device=cpu"])
    assert evaluate(cfg)["tiles"] == 16
    assert json.loads((sweep / "eval" / "cv-test" / "metrics.json").read_text())["tiles"] == 16


def test_an_ensemble_averages_probabilities_and_refuses_members_of_other_tile_sizes():
    a, b = pointwise_module(1.0, 0.0), pointwise_module(-2.0, 0.5)
    for m in (a, b):
        m.hparams.tile_size = [32, 32]
    ensemble = Ensemble([a, b], 0.45, PostProcess(3))
    depth, valid = torch.randn(2, 1, 8, 8), torch.ones(2, 1, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        expected = (torch.sigmoid(a(depth, valid)) + torch.sigmoid(b(depth, valid))) / 2
        assert torch.allclose(torch.sigmoid(ensemble(depth, valid)), expected, atol=1e-6)
    assert isinstance(ensemble, torch.nn.Module) and not isinstance(ensemble, GlintModule)
    assert ensemble.stride == 1 and ensemble.tile_size == [32, 32]
    assert ensemble.threshold == 0.45 and ensemble.postprocess == PostProcess(3)
    b.hparams.tile_size = [64, 64]
    with pytest.raises(GlintError, match=r"different tile sizes \(32x32, 64x64\)"):
        Ensemble([a, b], 0.5)
