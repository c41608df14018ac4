"""Several tile files (a list or a glob) read lazily as one set: the same tiles in the same order as reading the
files one by one, through workers too; mismatched files refused; each file described and fingerprinted."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from glint_lightning.data import GlintDataModule
from glint_lightning.data import h5 as h5_module
from glint_lightning.data.h5 import depth_and_validity
from glint_lightning.data.sources import file_fingerprint
from glint_lightning.utils.errors import GlintError
from tests.helpers import random_tiles, write_tiles

SIZES = (7, 12, 5, 9)


def _files(tmp_path, compression=None) -> list[str]:
    paths = []
    for i, n in enumerate(SIZES):
        depth, mask = random_tiles(n, size=16, seed=i)
        depth[0, 0, :3] = (0.0, np.nan, np.inf)
        valid = np.random.default_rng(i).random(mask.shape) > 0.1
        path = tmp_path / f"part{i}.h5"
        with h5py.File(path, "w") as f:
            for key, data in (("depth", depth), ("mask", mask), ("valid", valid)):
                f.create_dataset(key, data=data, chunks=(1, 16, 16), compression=compression)
            f["frame"] = np.arange(n) + 100 * i
        paths.append(str(path))
    return paths


def _one_by_one(paths: list[str]) -> dict[str, np.ndarray]:
    """Every tile of every file, read plainly with h5py in file order."""
    out = {"depth": [], "mask": [], "valid": []}
    for p in paths:
        with h5py.File(p, "r") as f:
            depth, valid = depth_and_validity(f["depth"][()], 1.0, f["valid"][()])
            out["depth"].append(depth)
            out["mask"].append(f["mask"][()].astype(np.float32))
            out["valid"].append(valid)
    return {k: np.concatenate(v)[:, None] for k, v in out.items()}


def _dm(**kw) -> GlintDataModule:
    dm = GlintDataModule(**{"batch_size": 4, "eval_batch_size": 6, "norm_samples": 8, **kw})
    dm.setup("fit")
    return dm


def _all(loader) -> dict[str, np.ndarray]:
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]).numpy() for k in ("depth", "mask", "valid")}


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_many_files_read_like_the_files_one_by_one(tmp_path, compression):
    paths = _files(tmp_path, compression)
    expected = _one_by_one(paths)
    (tmp_path / "val").mkdir()
    val = write_tiles(tmp_path / "val" / "v.h5", *random_tiles(3, size=16))
    for spec in (paths, str(tmp_path / "part*.h5")):
        for workers in (0, 2):
            dm = _dm(train_path=spec, val_path=str(val), num_workers=workers)
            ds = dm.datasets["train"]
            assert ds.paths == paths and len(ds) == sum(SIZES) and np.array_equal(ds.indices, np.arange(sum(SIZES)))
            assert not ds.is_open(), "no handle may be open in the parent before the workers fork"
            got = _all(dm.eval_loader("train", shard=False))
            for k in expected:
                np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{k}, {workers} workers")


def test_a_shuffled_epoch_across_files_is_the_same_with_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(h5_module, "MAX_OPEN_FILES", 2)  # fewer handles than files: the oldest one is closed
    paths = _files(tmp_path)
    expected = _one_by_one(paths)
    dms = {w: _dm(train_path=paths, val_fraction=0.2, num_workers=w, persistent_workers=True, seed=3) for w in (0, 2)}
    loaders = {w: dm.train_dataloader() for w, dm in dms.items()}
    for epoch in range(3):  # epochs left after two batches: the reset drops prefetched batches, freeing slots
        loaders[2].sampler.set_epoch(epoch)
        it = iter(loaders[2])
        next(it), next(it)
    for epoch in (4, 5):
        batches = {}
        for w, loader in loaders.items():
            loader.sampler.set_epoch(epoch)
            batches[w] = list(loader)  # kept: a later batch must not overwrite an earlier one
        order = [loaders[0].dataset.indices[i] for i in loaders[0].sampler][: len(batches[0]) * 4]
        assert len(batches[0]) == len(batches[2])
        for k in expected:
            for w in (0, 2):
                got = torch.cat([b[k] for b in batches[w]]).numpy()
                np.testing.assert_array_equal(got, expected[k][order], err_msg=f"{k}, {w} workers, epoch {epoch}")
    pools = loaders[2].slot_pools
    assert any(p.flags.numpy().any() for p in pools), "kept batches keep their slots"
    del batches
    assert all(not p.flags.numpy().any() for p in pools), "every slot is free once its batch is gone"


def test_files_that_disagree_are_refused_naming_both(tmp_path):
    a = write_tiles(tmp_path / "a.h5", *random_tiles(4, size=16))
    cases = {
        "tile size (32, 32) differs from": write_tiles(tmp_path / "b.h5", *random_tiles(4, size=32)),
        "'depth' dtype float16 differs": write_tiles(
            tmp_path / "c.h5", random_tiles(4, size=16)[0].astype(np.float16), random_tiles(4, size=16)[1]
        ),
        "'valid' dataset present differs": write_tiles(
            tmp_path / "d.h5", *random_tiles(4, size=16), valid=np.ones((4, 16, 16), bool)
        ),
    }
    for what, other in cases.items():
        with pytest.raises(GlintError) as err:
            _dm(train_path=[str(a), str(other)])
        message = str(err.value)
        assert "\n" not in message and what in message, message
        assert message.startswith(str(other)) and str(a) in message and "data.train_path" in message


def test_bad_lists_and_globs_are_refused_in_one_line(tmp_path):
    a = str(write_tiles(tmp_path / "a.h5", *random_tiles(4, size=16)))
    with pytest.raises(GlintError, match=r"data\.train_path: the pattern '.*nothing/\*\.h5' matches no file"):
        _dm(train_path=str(tmp_path / "nothing" / "*.h5"))
    with pytest.raises(GlintError, match=r"data\.val_path: the pattern 'v\*\.h5' matches no file"):
        _dm(train_path=a, val_path="v*.h5")
    with pytest.raises(GlintError, match=r"a\.h5 is listed twice"):
        _dm(train_path=[a, str(tmp_path / "*.h5")])
    with pytest.raises(GlintError, match=r"data\.train_path=\[\]: the list is empty"):
        _dm(train_path=[])


def test_each_file_is_described_and_fingerprinted(tmp_path):
    paths = _files(tmp_path)
    dm = _dm(train_path=paths, val_fraction=0.25, split_by="file")
    desc = dm.describe()
    files = desc["splits"]["train"]["files"]
    assert [f["path"] for f in files] == paths and [f["tiles"] for f in files] == list(SIZES)
    assert [f["fingerprint"] for f in files] == [file_fingerprint(p) for p in paths]
    assert desc["split_by"] == "file" and desc["val_indices"] == dm.datasets["val"].indices.tolist()
    assert dm.data_files() == {
        **{f"train[{i}]": p for i, p in enumerate(paths)},
        **{f"val[{i}]": p for i, p in enumerate(paths)},
    }


def test_provenance_fingerprints_every_file_of_a_split(tmp_path):
    from glint_lightning.runs.provenance import provenance

    paths = _files(tmp_path)
    dm = _dm(train_path=paths, val_fraction=0.3)
    data = provenance([], dm.data_files())["data"]
    assert sorted(k for k in data if k.startswith("train")) == [f"train[{i}]" for i in range(len(paths))]
    assert [data[f"train[{i}]"]["fingerprint"] for i in range(len(paths))] == [file_fingerprint(p) for p in paths]
