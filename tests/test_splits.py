"""Held-out splits and cross-validation folds that do not leak: whole frames (or files) on one side only,
deterministic in the seed, recorded in the data description."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest

from glint_lightning.data import GlintDataModule
from glint_lightning.data.splits import assign_folds, hold_out
from glint_lightning.utils.errors import GlintError
from tests.helpers import random_tiles, write_tiles


def _frames(n_frames: int, seed: int = 0) -> np.ndarray:
    """Frame id per tile: frames of 1 to 6 tiles, ids not in tile order (as a converter keeping some tiles)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(1000)[:n_frames] * 3
    return np.repeat(ids, rng.integers(1, 7, n_frames))


def _file(path, frames: np.ndarray | None, seed: int = 0):
    write_tiles(path, *random_tiles(len(frames) if frames is not None else 40, size=16, seed=seed))
    if frames is not None:
        with h5py.File(path, "a") as f:
            f["frame"] = frames
    return str(path)


def _dm(**kw) -> GlintDataModule:
    dm = GlintDataModule(**{"batch_size": 4, "norm_samples": 8, **kw})
    dm.setup("fit")
    return dm


def _disjoint(*arrays: np.ndarray) -> bool:
    sets = [set(np.asarray(a).tolist()) for a in arrays]
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])


def test_assign_folds_is_deterministic_disjoint_covering_and_balanced():
    units = _frames(50, seed=1)
    folds = assign_folds(units, 4, seed=3)
    assert np.array_equal(folds, assign_folds(units, 4, seed=3))
    assert not np.array_equal(folds, assign_folds(units, 4, seed=4)), "another seed, other folds"
    assert set(folds.tolist()) == {0, 1, 2, 3} and len(folds) == len(units)
    for u in np.unique(units):
        assert len(set(folds[units == u].tolist())) == 1, f"frame {u} is split across folds"
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 6, f"fold sizes {sizes} not balanced to within one frame"
    tiles = assign_folds(np.arange(103), 5, seed=0)
    assert sorted(np.bincount(tiles).tolist()) == [20, 20, 21, 21, 21]
    with pytest.raises(GlintError, match=r"data\.folds=1; use at least 2 folds"):
        assign_folds(units, 1, 0)
    with pytest.raises(GlintError, match=r"data\.folds=5: only 3 split units"):
        assign_folds(np.array([1, 1, 2, 3]), 5, 0)


def test_hold_out_by_tile_is_the_plain_seeded_permutation():
    (first, second), rest = hold_out(np.arange(50), [5, 10], seed=7)
    order = np.random.default_rng(7).permutation(50)
    assert np.array_equal(first, np.sort(order[:5])) and np.array_equal(second, np.sort(order[5:15]))
    assert np.array_equal(rest, np.sort(order[15:]))


def test_held_out_splits_never_share_a_frame(tmp_path, caplog):
    frames = _frames(60)
    path = _file(tmp_path / "t.h5", frames)
    with caplog.at_level(logging.INFO, logger="glint_lightning"):
        dm = _dm(train_path=path, val_fraction=0.2, test_fraction=0.1, split_seed=2)
    assert dm.split_by == "frame"
    units = {k: dm.split_units(k) for k in ("train", "val", "test")}
    assert _disjoint(*units.values()), "a frame has tiles in two splits"
    idx = {k: dm.datasets[k].indices for k in units}
    assert _disjoint(*idx.values()) and sorted(np.concatenate(list(idx.values())).tolist()) == list(range(len(frames)))
    for k in units:
        assert np.array_equal(units[k], frames[idx[k]])
    n = len(frames)
    assert abs(len(idx["val"]) - 0.2 * n) <= 6 and abs(len(idx["test"]) - 0.1 * n) <= 6
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data: "))
    assert "split by frame" in line and f"val {len(idx['val'])} tiles / {len(np.unique(units['val']))} frames" in line
    again = _dm(train_path=path, val_fraction=0.2, test_fraction=0.1, split_seed=2)
    assert np.array_equal(again.datasets["val"].indices, idx["val"])


def test_no_frame_ids_fall_back_to_tiles_with_a_note(tmp_path, caplog):
    path = _file(tmp_path / "plain.h5", None)
    with caplog.at_level(logging.INFO, logger="glint_lightning"):
        dm = _dm(train_path=path, val_fraction=0.25)
    notes = [r.getMessage() for r in caplog.records if "records no frame ids" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "plain.h5" in notes[0]
    assert dm.split_by == "tile" and np.array_equal(dm.split_units("val"), dm.datasets["val"].indices)
    with pytest.raises(GlintError, match=r"plain\.h5: no per-tile frame ids \('frame'\); data\.split_by=frame"):
        _dm(train_path=path, split_by="frame")


@pytest.mark.parametrize("test_fraction", [0.0, 0.15])
def test_folds_partition_the_training_pool_by_frame(tmp_path, test_fraction):
    frames = _frames(40, seed=4)
    path = _file(tmp_path / "t.h5", frames)
    vals, tests = [], []
    for k in range(3):
        dm = _dm(train_path=path, folds=3, fold=k, split_seed=5, test_fraction=test_fraction)
        train, val = dm.datasets["train"].indices, dm.datasets["val"].indices
        assert _disjoint(dm.split_units("train"), dm.split_units("val"))
        vals.append(val)
        if test_fraction:
            test = dm.datasets["test"].indices
            tests.append(test)
            assert _disjoint(test, train, val) and _disjoint(dm.split_units("test"), frames[np.union1d(train, val)])
        pool = np.union1d(train, val)
        expected = pool[assign_folds(frames[pool], 3, seed=5) == k]
        assert np.array_equal(val, expected), "the val split of fold k is fold k of assign_folds"
    assert _disjoint(*vals) and np.array_equal(np.sort(np.concatenate(vals)), pool), "folds cover the pool once"
    if test_fraction:
        assert all(np.array_equal(t, tests[0]) for t in tests), "the test split is the same for every fold"
        plain = _dm(train_path=path, split_seed=5, test_fraction=test_fraction, val_fraction=0.2)
        assert np.array_equal(plain.datasets["test"].indices, tests[0]), "and the same without folds"


def test_split_by_file_holds_out_whole_files(tmp_path):
    paths = [_file(tmp_path / f"r{i}.h5", _frames(4, seed=i), seed=i) for i in range(6)]
    dm = _dm(train_path=paths, split_by="file", val_fraction=0.3, split_seed=1)
    assert _disjoint(dm.split_units("train"), dm.split_units("val"))
    offsets = np.cumsum([0] + [len(_frames(4, seed=i)) for i in range(6)])
    for f in np.unique(dm.split_units("val")):
        assert set(range(offsets[f], offsets[f + 1])) <= set(dm.datasets["val"].indices.tolist())
    folds = _dm(train_path=paths, split_by="file", folds=3, fold=1)
    assert (
        _disjoint(folds.split_units("train"), folds.split_units("val"))
        and len(np.unique(folds.split_units("val"))) == 2
    )


def test_the_data_description_records_folds_units_and_val_indices(tmp_path):
    frames = _frames(30, seed=2)
    dm = _dm(train_path=_file(tmp_path / "t.h5", frames), folds=4, fold=2)
    dm.save_description(tmp_path / "data.json")
    desc = json.loads((tmp_path / "data.json").read_text())
    assert (desc["folds"], desc["fold"], desc["split_by"]) == (4, 2, "frame")
    assert desc["val_indices"] == dm.datasets["val"].indices.tolist()
    assert desc["tiles"] == {"train": len(dm.datasets["train"]), "val": len(dm.datasets["val"])}
    assert desc["units"] == {k: len(np.unique(dm.split_units(k))) for k in ("train", "val")}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"folds": 3, "fold": 3}, r"data\.fold=3 is outside 0\.\.2"),
        ({"folds": 3}, r"data\.fold=None is outside 0\.\.2"),
        ({"folds": 1, "fold": 0}, r"data\.folds=1; use at least 2 folds"),
        ({"fold": 1}, r"data\.fold=1 without data\.folds"),
        ({"folds": 3, "fold": 0, "val_path": "v.h5"}, r"data\.folds=3 with data\.val_path=v\.h5"),
        ({"split_by": "scene"}, r"data\.split_by=scene; use file, frame, tile or null"),
    ],
)
def test_fold_and_split_options_are_refused_in_one_line(kwargs, match):
    with pytest.raises(GlintError, match=match) as err:
        GlintDataModule(train_path="t.h5", **kwargs)
    assert "\n" not in str(err.value)
