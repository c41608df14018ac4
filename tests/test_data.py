import h5py
import numpy as np
import pytest
import torch

from glint_lightning.data import GlintDataModule
from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.utils.errors import GlintError
from tests.helpers import random_tiles, write_tiles


def _dm(**kw):
    dm = GlintDataModule(**{"batch_size": 4, **kw})
    dm.setup("fit")
    return dm


def test_separate_split_files(tmp_path):
    paths = {}
    for i, (split, n) in enumerate({"train": 20, "val": 6, "test": 4}.items()):
        paths[f"{split}_path"] = str(write_tiles(tmp_path / f"{split}.h5", *random_tiles(n, seed=i)))
    dm = _dm(**paths)
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 20, "val": 6, "test": 4}


def test_split_fraction_is_disjoint_complete_and_seeded(tmp_path):
    path = str(write_tiles(tmp_path / "all.h5", *random_tiles(100)))
    dm = _dm(train_path=path, val_fraction=0.2, test_fraction=0.1, split_seed=5)
    idx = {k: set(v.indices.tolist()) for k, v in dm.datasets.items()}
    assert [len(idx[k]) for k in ("train", "val", "test")] == [70, 20, 10]
    assert idx["train"] | idx["val"] | idx["test"] == set(range(100))
    assert not (idx["train"] & idx["val"]) and not (idx["val"] & idx["test"])
    again = _dm(train_path=path, val_fraction=0.2, test_fraction=0.1, split_seed=5)
    assert set(again.datasets["val"].indices.tolist()) == idx["val"]
    other = _dm(train_path=path, val_fraction=0.2, test_fraction=0.1, split_seed=6)
    assert set(other.datasets["val"].indices.tolist()) != idx["val"]


@pytest.mark.parametrize("layout", ["float16", "uint16_scaled", "n1hw"])
def test_depth_dtypes_and_layouts_give_millimetres(tmp_path, layout):
    depth, mask = random_tiles(8)
    depth = np.round(depth)
    scale = None
    if layout == "float16":
        stored = depth.astype(np.float16)
        expected = stored.astype(np.float32)
    elif layout == "uint16_scaled":
        scale = 0.5
        stored = (depth / scale).astype(np.uint16)
        expected = stored.astype(np.float32) * scale
    else:
        stored, expected = depth[:, None], depth
    path = write_tiles(tmp_path / "t.h5", stored, mask, scale=scale)
    dm = _dm(train_path=str(path), val_fraction=0.25)
    item = dm.datasets["train"][0]
    i = dm.datasets["train"].indices[0]
    assert item["depth"].shape == (1, 32, 32) and item["depth"].dtype == torch.float32
    np.testing.assert_allclose(item["depth"][0].numpy(), expected[i].reshape(32, 32), rtol=1e-6)


def test_validity_from_key_or_from_zero_and_nan(tmp_path):
    depth, mask = random_tiles(4)
    depth[0, 0, 0], depth[0, 0, 1] = 0.0, np.nan
    valid = np.ones_like(mask, dtype=bool)
    valid[0, 5, 5] = False
    with_key = _dm(train_path=str(write_tiles(tmp_path / "a.h5", depth, mask, valid)), val_fraction=0.25)
    without = _dm(train_path=str(write_tiles(tmp_path / "b.h5", depth, mask)), val_fraction=0.25)
    for dm in (with_key, without):
        ds = dm.datasets["train"]
        _, _, v = ds.read(0)
        d, _, _ = ds.read(0)
        assert not v[0, 1] and d[0, 1] == 0.0, "NaN depth is invalid and enters as 0"
    assert with_key.datasets["train"].read(0)[2][5, 5] == False  # noqa: E712
    assert with_key.datasets["train"].read(0)[2][0, 0], "with a valid key, depth 0 can be a scored pixel"
    assert not without.datasets["train"].read(0)[2][0, 0], "without one, depth 0 is invalid"


def test_normalisation_statistics_over_valid_pixels(tmp_path):
    depth, mask = random_tiles(10)
    depth[:, :4] = 0.0
    dm = _dm(
        train_path=str(write_tiles(tmp_path / "t.h5", depth, mask)),
        val_fraction=0.0,
        val_path=str(write_tiles(tmp_path / "v.h5", *random_tiles(2))),
        norm_samples=1000,
    )
    values = depth[depth != 0].astype(np.float64)
    assert dm.depth_stats == pytest.approx((values.mean(), values.std()), rel=1e-6)
    assert dm.describe()["depth_mean_mm"] == pytest.approx(values.mean())


def _batches(dm, epoch):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [b for b in loader]


def test_num_workers_gives_identical_batches(tmp_path):
    path = str(write_tiles(tmp_path / "t.h5", *random_tiles(40)))
    dm0 = _dm(train_path=path, val_fraction=0.1, num_workers=0, seed=7)
    dm2 = _dm(train_path=path, val_fraction=0.1, num_workers=2, seed=7)
    assert not dm2.datasets["train"].is_open(), "no h5py handle may be open in the parent before the fork"
    for epoch in (0, 1):
        b0, b2 = _batches(dm0, epoch), _batches(dm2, epoch)
        assert len(b0) == len(b2) == 9
        for x, y in zip(b0, b2):
            for k in ("depth", "mask", "valid"):
                assert torch.equal(x[k], y[k])
    assert not torch.equal(_batches(dm0, 0)[0]["depth"], _batches(dm0, 1)[0]["depth"]), "epochs reshuffle"


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, True)])
def test_a_mid_epoch_loader_state_resumes_the_epoch_bit_exactly(tmp_path, workers, persistent):
    """What a mid-epoch checkpoint stores (epoch, batches done) replays exactly the rest of that epoch's batches,
    with workers too; the epoch after it starts from its beginning again."""
    path = str(write_tiles(tmp_path / "t.h5", *random_tiles(40)))
    straight = _batches(_dm(train_path=path, val_fraction=0.1, seed=7), epoch=1)
    loader = _dm(train_path=path, val_fraction=0.1, seed=7, num_workers=workers, persistent_workers=persistent)
    loader = loader.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches_done": 3})
    rest = list(loader)
    assert len(rest) == len(straight) - 3 and loader.batches_done == 3
    for x, y in zip(straight[3:], rest):
        assert all(torch.equal(x[k], y[k]) for k in ("depth", "mask", "valid"))
    assert len(list(loader)) == len(straight), "only the resumed epoch is shortened"
    loader.load_state_dict({"epoch": 1, "batches_done": len(straight)})
    assert loader.sampler.epoch == 2, "saved after an epoch's last step: the next epoch starts afresh"


def test_augmentation_is_consistent_across_keys_and_seeded():
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(16, 1, 8, 8, generator=gen) > 0.7).float()
    valid = torch.rand(16, 1, 8, 8, generator=gen) > 0.1
    depth = 1000 + 100 * mask + 10 * valid.float() + torch.arange(64.0).view(1, 1, 8, 8) / 100
    batch = {"depth": depth, "mask": mask, "valid": valid}
    out1 = augment_batch(batch, AugmentConfig(), torch.Generator().manual_seed(1))
    out2 = augment_batch(batch, AugmentConfig(), torch.Generator().manual_seed(1))
    assert all(torch.equal(out1[k], out2[k]) for k in batch)
    assert not torch.equal(out1["depth"], depth), "something was flipped or rotated"
    coded = out1["depth"].floor() - 1000
    assert torch.equal(coded, 100 * out1["mask"] + 10 * out1["valid"].float()), "keys move together"
    noisy = augment_batch(batch, AugmentConfig(False, False, False, depth_noise=0.01), torch.Generator().manual_seed(1))
    assert torch.equal(noisy["depth"][~valid], depth[~valid]) and not torch.equal(noisy["depth"], depth)


def test_no_augmentation_outside_training(tmp_path):
    dm = _dm(train_path=str(write_tiles(tmp_path / "t.h5", *random_tiles(8))), val_fraction=0.25)
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0) is batch


def _bad(tmp_path, **files):
    for name, content in files.items():
        write_tiles(tmp_path / name, *content) if isinstance(content, tuple) else (tmp_path / name).write_bytes(content)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", r"nope\.h5: no such file"),
        ("not_hdf5", r"junk\.h5: cannot be read as HDF5"),
        ("missing_key", r"t\.h5: no dataset 'mask'.*data\.keys"),
        ("wrong_rank", r"t\.h5: 'depth' has shape \(4, 32\)"),
        ("shape_mismatch", r"t\.h5: 'mask' has shape \(4, 16, 16\) but 'depth' has \(4, 32, 32\)"),
        ("mask_values", r"t\.h5: 'mask' tile 2 has values \[2\] outside \{0, 1\}"),
        ("empty_split", r"t\.h5: the val split is empty"),
        ("all_invalid", r"t\.h5: no valid depth pixel"),
        ("all_inf", r"t\.h5: no valid depth pixel"),
    ],
)
def test_bad_input_names_file_key_and_fix(tmp_path, case, match):
    depth, mask = random_tiles(4)
    path = tmp_path / "t.h5"
    if case == "missing_file":
        path = tmp_path / "nope.h5"
    elif case == "not_hdf5":
        path = tmp_path / "junk.h5"
        path.write_text("not hdf5")
    elif case == "missing_key":
        with h5py.File(path, "w") as f:
            f["depth"] = depth
    elif case == "wrong_rank":
        write_tiles(path, depth[:, 0], mask[:, 0])
    elif case == "shape_mismatch":
        write_tiles(path, depth, mask[:, :16, :16])
    elif case == "mask_values":
        mask[2, 3, 3] = 2
        write_tiles(path, depth, mask)
    elif case == "empty_split":
        write_tiles(path, depth, mask)
        write_tiles(tmp_path / "v.h5", depth[:0], mask[:0])
    elif case == "all_invalid":
        write_tiles(path, np.full_like(depth, np.nan), mask)
    elif case == "all_inf":
        write_tiles(path, np.full_like(depth, np.inf), mask)
    kwargs = {"train_path": str(path), "val_fraction": 0.25}
    if case == "empty_split":
        kwargs = {"train_path": str(path), "val_path": str(tmp_path / "v.h5")}
        match = r"v\.h5: the val split is empty"
    with pytest.raises(GlintError, match=match):
        _dm(**kwargs)


def test_bad_options_are_refused():
    with pytest.raises(GlintError, match="data.batch_size=0"):
        GlintDataModule(train_path="x.h5", batch_size=0)
    with pytest.raises(GlintError, match="data.val_fraction"):
        GlintDataModule(train_path="x.h5", val_fraction=1.5)
    with pytest.raises(GlintError, match="data.train_path is not set"):
        GlintDataModule()


def test_augmentation_on_cpu_and_on_accelerators_is_the_reference_composition():
    """augment_batch copies per sample on CPU and gathers through index maps elsewhere: both must equal flipping
    left-right, then up-down, then torch.rot90, sample by sample."""
    from glint_lightning.data.augment import _dihedral_gather, _dihedral_numpy

    gen = torch.Generator().manual_seed(0)
    x = {"f": torch.rand(16, 1, 6, 6, generator=gen), "b": torch.rand(16, 1, 6, 6, generator=gen) > 0.5}
    hflip, vflip, turns = (torch.arange(16) % 2, torch.arange(16) // 2 % 2, torch.arange(16) // 4)
    for v in x.values():
        expected = []
        for i in range(16):
            s = v[i].flip(-1) if hflip[i] else v[i]
            s = s.flip(-2) if vflip[i] else s
            expected.append(torch.rot90(s, int(turns[i]), dims=(-2, -1)))
        expected = torch.stack(expected)
        assert torch.equal(_dihedral_numpy(v, hflip.tolist(), vflip.tolist(), turns.tolist()), expected)
        assert torch.equal(_dihedral_gather(v, hflip + 2 * vflip + 4 * turns), expected)


def test_a_plain_dataloader_with_workers_reads_the_same_batches(tmp_path):
    """Outside the module's own loaders (no shared-memory slots) workers send whole batches: the same tiles."""
    from torch.utils.data import DataLoader

    from glint_lightning.data.h5 import collate_tiles

    dm = _dm(train_path=str(write_tiles(tmp_path / "t.h5", *random_tiles(20))), val_fraction=0.2)
    ds = dm.datasets["train"]
    plain = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_tiles))
    ours = list(dm.eval_loader("train", shard=False))
    assert len(plain) == len(ours) == 4
    for x, y in zip(plain, ours):
        assert all(torch.equal(x[k], y[k]) for k in ("depth", "mask", "valid"))


def test_one_loader_iterated_twice_at_once_reads_the_same_tiles(tmp_path):
    """Without persistent workers each iteration starts workers with shared-memory slots of its own."""
    dm = _dm(train_path=str(write_tiles(tmp_path / "t.h5", *random_tiles(20))), val_fraction=0.2, num_workers=2)
    loader = dm.eval_loader("train", shard=False)
    pairs = list(zip(loader, loader))
    assert len(pairs) == 4
    for x, y in pairs:
        assert all(torch.equal(x[k], y[k]) for k in ("depth", "mask", "valid"))
