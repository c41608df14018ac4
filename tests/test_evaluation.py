"""Object-level metrics, threshold calibration and the eval entry point."""

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.data import GlintDataModule
from glint_lightning.eval import build_data, evaluate
from glint_lightning.inference.calibration import calibrate_threshold
from glint_lightning.metrics import ObjectMetric, match_components
from glint_lightning.module import GlintModule
from glint_lightning.scoring import predict_loader
from glint_lightning.train import train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import pointwise_module, random_tiles, run_cli, write_tiles


def _mask(*boxes, size=12):
    m = np.zeros((size, size), bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_components_match_one_to_one_by_iou():
    truth = _mask((1, 3, 1, 3), (6, 9, 6, 9))
    pred = _mask((1, 3, 1, 4), (0, 1, 11, 12))  # IoU 4/6 with the first glint, and a spurious pixel
    assert match_components(truth, pred, 0.25) == (1, 2, 2)
    assert match_components(truth, pred, 0.7) == (0, 2, 2)
    merged = _mask((1, 9, 1, 9))  # one blob over both glints matches at most one of them
    assert match_components(truth, merged, 0.01) == (1, 1, 2)
    diagonal = np.eye(4, dtype=bool)  # 8-connected: one glint, not four
    assert match_components(diagonal, diagonal, 0.5) == (1, 1, 1)
    assert match_components(truth, np.zeros_like(truth), 0.5) == (0, 0, 2)


def test_object_metric_over_tiles():
    metric = ObjectMetric(threshold=0.5, iou_threshold=0.25)
    truth = torch.from_numpy(np.stack([_mask((1, 3, 1, 3), (6, 9, 6, 9)), _mask()])[:, None]).float()
    pred = torch.from_numpy(np.stack([_mask((1, 3, 1, 3)), _mask((4, 6, 4, 6))])[:, None]).float()
    metric.update(pred * 0.9 + 0.05, truth)
    r = metric.compute()
    assert (r["matched"], r["predicted"], r["true"]) == (1, 2, 2)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(0.5)
    empty = ObjectMetric()
    empty.update(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    assert empty.compute()["f1"] == 1.0, "nothing to find and nothing found is perfect"


def _crafted_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, masks and validity with blobs that overlap partly and invalid pixels cutting through some."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, 1, 24, 24, generator=g) < 0.08).float()
    mask = torch.nn.functional.max_pool2d(mask, 3, 1, 1)  # blobs of a few pixels
    shifted = torch.roll(mask, shifts=(1, 0), dims=(2, 3))
    prob = (0.6 * shifted + 0.4 * torch.rand(n, 1, 24, 24, generator=g)).clamp(0, 1)
    valid = torch.rand(n, 1, 24, 24, generator=g) > 0.05
    return prob, mask, valid


def test_object_metric_equals_the_per_tile_computation_and_merges_like_ddp():
    prob, mask, valid = _crafted_batch(8, seed=1)
    threshold, iou = 0.45, 0.3
    # the old per-tile computation: binary masks restricted to valid pixels, matched tile by tile, counts summed
    truth_np = (mask.bool() & valid)[:, 0].numpy()
    pred_np = ((prob >= threshold) & valid)[:, 0].numpy()
    expected = np.sum([match_components(t, p, iou) for t, p in zip(truth_np, pred_np)], axis=0)
    assert expected[0] > 0 and expected[1] != expected[0], "the batch must exercise partial matching"

    whole = ObjectMetric(threshold, iou)
    whole.update(prob, mask, valid)
    r = whole.compute()
    assert (int(r["matched"]), int(r["predicted"]), int(r["true"])) == tuple(int(v) for v in expected)
    precision, recall = expected[0] / expected[1], expected[0] / expected[2]
    assert float(r["precision"]) == pytest.approx(precision) and float(r["recall"]) == pytest.approx(recall)
    assert float(r["f1"]) == pytest.approx(2 * precision * recall / (precision + recall))

    # two ranks score disjoint shards; DDP sums the states (dist_reduce_fx="sum"), as merge_state does here
    rank0, rank1 = ObjectMetric(threshold, iou), ObjectMetric(threshold, iou)
    rank0.update(prob[0::2], mask[0::2], valid[0::2])
    rank1.update(prob[1::2], mask[1::2], valid[1::2])
    assert rank0.compute()["true"] < r["true"]
    rank0.reset()  # compute() caches; start over with the shard's counts and merge the other rank's
    rank0.update(prob[0::2], mask[0::2], valid[0::2])
    rank0.merge_state(rank1)
    merged = rank0.compute()
    assert {k: float(v) for k, v in merged.items()} == {k: float(v) for k, v in r.items()}


def test_calibration_finds_the_separating_threshold():
    module = pointwise_module(1.0, 0.0)  # logit = depth: positives at +1 (p=0.73), negatives at -1 (p=0.27)
    mask = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    batch = {"depth": mask * 2 - 1, "mask": mask, "valid": torch.ones_like(mask, dtype=torch.bool)}
    threshold, f1 = calibrate_threshold(module, [batch], "cpu")
    assert f1 == pytest.approx(1.0) and 0.27 < threshold <= 0.73


def _eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=["device=cpu", *overrides])


def test_eval_scores_the_file_it_is_told(trained_ckpt, tmp_path):
    """A demo-trained checkpoint: data.test_path=other.h5 replaces the demo test split instead of being ignored."""
    other = write_tiles(tmp_path / "other.h5", *random_tiles(5, size=32, seed=7))
    default = evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", f"out={tmp_path / 'demo'}"))
    told = evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", f"data.test_path={other}", f"out={tmp_path / 'other'}"))
    assert default["tiles"] == 16 and default["file"].endswith("test.h5")
    assert told["tiles"] == 5 and told["file"] == str(other)
    assert told["test/iou"] != pytest.approx(default["test/iou"])
    assert told["scored"] == f"5 tiles of {other}"
    written = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert written["file"] == str(other) and written["tiles"] == 5

    # the object counts eval reports are those of the old per-tile loop over the same predictions
    ckpt = load_checkpoint(trained_ckpt)
    module = GlintModule.from_checkpoint_dict(ckpt)
    datamodule = build_data(ckpt["hyper_parameters"]["config"], {"test_path": str(other)}, "test")
    counts = np.zeros(3, dtype=int)
    for prob, mask, valid in predict_loader(module, datamodule.eval_loader("test"), "cpu"):
        truth = (mask.bool() & valid)[:, 0].numpy()
        pred = ((prob >= told["threshold"]) & valid)[:, 0].numpy()
        counts += np.sum([match_components(t, p, 0.25) for t, p in zip(truth, pred)], axis=0)
    assert [told[f"test/object_{k}"] for k in ("matched", "predicted", "true")] == counts.tolist()


def test_a_split_with_its_own_file_needs_nothing_else(tmp_path):
    """Scoring other.h5 opens only other.h5: the training file may be gone, the demo set is not generated."""
    other = write_tiles(tmp_path / "other.h5", *random_tiles(3, size=32))
    dm = GlintDataModule(train_path=str(tmp_path / "gone.h5"), test_path=str(other))
    dm.setup_split("test")
    assert list(dm.datasets) == ["test"] and len(dm.datasets["test"]) == 3
    demo = {"cache_dir": str(tmp_path / "cache"), "n_train": 8, "n_val": 4, "n_test": 4, "tile": 32, "seed": 0}
    dm = GlintDataModule(test_path=str(other), demo=demo)
    assert dm.paths["test"] == str(other) and dm.paths["val"].endswith("val.h5"), "a given path wins over the demo"
    dm.setup_split("test")
    assert not (tmp_path / "cache").exists()


def test_eval_scores_each_split_under_its_name(trained_ckpt, tmp_path):
    results = {
        split: evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", f"split={split}", f"out={tmp_path / split}"))
        for split in ("train", "val", "test")
    }
    for split, tiles in (("train", 48), ("val", 16), ("test", 16)):
        r = results[split]
        assert r["split"] == split and r["tiles"] == tiles and r["file"].endswith(f"{split}.h5")
        assert {f"{split}/iou", f"{split}/loss", f"{split}/object_f1", f"{split}/object_true"} <= set(r)
        others = [k for k in r if "/" in k and not k.startswith(f"{split}/")]
        assert not others, f"{split} eval reports {others}"
    assert len({results[s][f"{s}/object_true"] for s in results}) == 3, "three different sets of tiles"
    # the val split scored by eval is the one training validated on (same numbers as the stored val metrics)
    stored = torch.load(trained_ckpt, weights_only=True)["metrics"]
    assert results["val"]["val/loss"] == pytest.approx(stored["val/loss"], abs=1e-5)


def test_eval_reproduces_the_test_metrics_and_writes_reports(make_cfg, tmp_path, cache_dir):
    train(make_cfg("trainer.max_epochs=2"))
    run = tmp_path / "run"
    logged = json.loads((run / "metrics.json").read_text())
    best = logged["best_checkpoint"]
    stored = torch.load(best, weights_only=True)
    assert stored["hyper_parameters"]["threshold"] == pytest.approx(logged["threshold"]["value"])
    assert stored["threshold_calibration"]["val_f1"] == pytest.approx(logged["threshold"]["val_f1"])
    assert {"test/object_precision", "test/object_recall", "test/object_f1"} <= set(logged["test"])

    result = evaluate(_eval_cfg(f"ckpt_path={best}"))
    out = run / "eval" / f"{Path(best).stem}-test"
    assert result["out"] == str(out)
    assert json.loads((out / "metrics.json").read_text())["tiles"] == 16
    for key, value in logged["test"].items():
        assert result[key] == pytest.approx(value, abs=1e-5), key
    assert result["threshold"] == pytest.approx(logged["threshold"]["value"])
    assert result["test/object_true"] > 0 and result["tiles"] == 16
    assert (out / "pr_curve.png").stat().st_size > 1000
    with open(out / "metrics.csv") as f:
        rows = dict(csv.reader(f))
    assert float(rows["test/iou"]) == pytest.approx(result["test/iou"])

    # overrides: another batch size (pixel metrics do not depend on it; batch Dice loss does), another threshold
    other = evaluate(
        _eval_cfg(f"ckpt_path={best}", "data.eval_batch_size=7", "threshold=0.9", f"out={tmp_path / 'e2'}")
    )
    assert other["threshold"] == 0.9 and other["tiles"] == 16
    assert other["test/ap"] == pytest.approx(result["test/ap"], abs=1e-5)


@pytest.mark.slow
def test_eval_command_line(tmp_path, trained_ckpt, cache_dir):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"GLINT_CACHE_DIR": str(cache_dir)}
    first, second = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "copy" / "checkpoints" / "second.ckpt"
    for copy in (first, second):  # the shared run's folder stays as it is
        copy.parent.mkdir(parents=True)
        copy.write_bytes(trained_ckpt.read_bytes())
    with ThreadPoolExecutor(max_workers=3) as pool:  # side by side: each process is mostly its imports
        shown, typo, both = pool.map(
            lambda args: run_cli("glint_lightning.eval", *args, cwd=cwd, env=env),
            [
                ["--help"],
                [f"ckpt_path={trained_ckpt}", "data.tset_path=x.h5"],
                # -m: one job per checkpoint, each writing where its options say; nothing is left in the cwd
                ["-m", f"ckpt_path={first},{second}", "split=val"],
            ],
        )
    assert shown.returncode == 0, shown.stderr[-2000:]
    for option in ("glint-eval", "ckpt_path", "split", "iou_threshold", "calibrate", "data.* ", "test_path"):
        assert option in shown.stdout, option

    assert typo.returncode == 2 and typo.stderr.count("\n") == 1 and "tset_path" in typo.stderr, typo.stderr
    # what the app turns into one `error:` line and exit 2 (tests/test_console_scripts.py runs that path)
    with pytest.raises(GlintError, match=r"^nope\.ckpt: no such file"):
        evaluate(_eval_cfg("ckpt_path=nope.ckpt", f"out={tmp_path / 'nope'}"))
    with pytest.raises(GlintError, match="no test split"):
        evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", "data.demo.n_test=0", f"out={tmp_path / 'no_test'}"))
    assert both.returncode == 0, both.stderr[-2000:]
    assert both.stdout.count("scored:     val split, 16 tiles of ") == 2, both.stdout
    assert (tmp_path / "copy" / "eval" / "second-val" / "metrics.json").is_file()
    assert (tmp_path / "run" / "eval" / "last-val" / "pr_curve.png").is_file()
    assert list(cwd.iterdir()) == []


def test_eval_with_tta_scores_the_averaged_probabilities(trained_ckpt, tmp_path):
    """tta=flip: the metrics are those of the mean of the four flipped predictions, and the output says so."""
    plain = evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", f"out={tmp_path / 'plain'}"))
    flip = evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", "tta=flip", f"out={tmp_path / 'flip'}"))
    assert plain["tta"] == "none" and flip["tta"] == "flip" and flip["tiles"] == plain["tiles"]
    assert flip["test/loss"] != pytest.approx(plain["test/loss"], abs=1e-6)

    ckpt = load_checkpoint(trained_ckpt)
    module = GlintModule.from_checkpoint_dict(ckpt)
    datamodule = build_data(ckpt["hyper_parameters"]["config"], {}, "test")
    losses = []
    with torch.no_grad():
        for batch in datamodule.eval_loader("test"):
            d, v = batch["depth"], batch["valid"]
            flips = [(), (-1,), (-2,), (-2, -1)]
            prob = sum(torch.sigmoid(module(d.flip(f), v.flip(f))).flip(f) if f else torch.sigmoid(module(d, v))
                       for f in flips) / 4  # fmt: skip
            losses.append((float(module.loss_fn(torch.logit(prob, eps=1e-6), batch["mask"], v)), len(d)))
    expected = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert flip["test/loss"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(GlintError, match="tta='spin'"):
        evaluate(_eval_cfg(f"ckpt_path={trained_ckpt}", "tta=spin", f"out={tmp_path / 'bad'}"))
