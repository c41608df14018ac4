"""data.check and data.convert: every problem named, and a convert -> check -> train round trip."""

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from glint_lightning.data.check import check_file, index_ranges
from glint_lightning.data.check import main as check_main
from glint_lightning.data.convert import convert
from glint_lightning.data.demo import synth_tile
from glint_lightning.train import train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import random_tiles, run_cli, write_tiles


def test_index_ranges():
    assert index_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert index_ranges(list(range(0, 20, 2)), limit=2) == "0, 2 and 8 more"


def test_check_reports_a_good_file(tmp_path):
    depth, mask = random_tiles(10)
    write_tiles(tmp_path / "ok.h5", depth, mask)
    summary, errors, warnings = check_file(tmp_path / "ok.h5")
    assert not errors and not warnings
    assert summary[0].startswith(f"{tmp_path / 'ok.h5'}: 10 tiles of 32x32; 'depth' float32")
    assert "glints: 10 tiles (100.0 %) have glints" in summary[1]


def test_check_names_every_problem_with_key_and_tiles(tmp_path):
    depth, mask = random_tiles(12)
    mask[2, 0, 0] = mask[3, 0, 0] = 7
    depth[5, 1, 1] = np.nan
    depth[8:10] = 0.0
    with h5py.File(tmp_path / "bad.h5", "w") as f:  # contiguous, not one tile per chunk
        f["depth"], f["mask"] = depth, mask
    _, errors, warnings = check_file(tmp_path / "bad.h5")
    assert errors == ["'mask' tiles 2-3: values [0, 1, 7] outside {0, 1}"]
    assert "'depth' tiles 8-9: no valid pixel (all 0, NaN or inf); they add nothing to training" in warnings
    assert "'depth' tiles 5: NaN or inf values (scored as invalid)" in warnings
    assert any(w.startswith("'depth': chunks None; one tile per chunk") for w in warnings)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.write_text("x"), "not an HDF5 file"),
        (lambda p: None, "no such file"),
        (
            lambda p: write_tiles(p, *random_tiles(3), keys=("d", "mask", "valid")),
            "'depth': missing (found ['d', 'mask']); pass --depth-key",
        ),
        (
            lambda p: write_tiles(p, random_tiles(3)[0], random_tiles(3)[1][:, :8]),
            "'mask': shape (3, 8, 32); expected (3, 32, 32)",
        ),
        (lambda p: write_tiles(p, random_tiles(3)[0][:0], random_tiles(3)[1][:0]), "'depth': no tiles"),
    ],
)
def test_check_fails_with_one_line_per_problem(tmp_path, capsys, setup, message):
    """The console script's main() in this process; the subprocess case below runs the command itself."""
    path = tmp_path / "t.h5"
    setup(path)
    assert check_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err


@pytest.mark.slow
def test_check_command_line_fails_with_one_line(tmp_path):
    path = tmp_path / "t.h5"
    path.write_text("x")
    res = run_cli("glint_lightning.data.check", str(path), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith(f"error: {path}: not an HDF5 file"), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr


def _recordings(path, n=8, h=80, w=100, seed=0):
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, h, w), np.float32)
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        d, m, _ = synth_tile(rng, max(h, w), glint_free=False)
        frames[i], masks[i] = d[:h, :w], m[:h, :w]
    with h5py.File(path, "w") as f:
        f["frames"], f["masks"] = frames, masks
    return frames, masks


def _args(**kw):
    """conf/convert.yaml with `kw` set (a key it does not have is an error, as on the command line)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.merge(compose("convert"), kw)


@pytest.mark.slow
def test_convert_check_train_round_trip(tmp_path, make_cfg):
    frames, masks = _recordings(tmp_path / "rec.h5")
    res = run_cli(
        "glint_lightning.data.convert",
        "src=rec.h5",
        "out=tiles.h5",
        "tile=32",
        "stride=24",
        "keep_empty=1.0",
        "split=[0.5,0.25,0.25]",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "train: tiles_train.h5 (" in res.stdout
    written = {"rec.h5", "tiles_train.h5", "tiles_val.h5", "tiles_test.h5"}
    assert {p.name for p in tmp_path.iterdir()} == written, "only the split files: no outputs/, .hydra or log"
    seen = {}
    for split in ("train", "val", "test"):
        path = tmp_path / f"tiles_{split}.h5"
        summary, errors, _ = check_file(path)
        assert not errors, errors
        with h5py.File(path) as f:
            assert f["depth"].chunks == (1, 32, 32) and f["depth"].compression == "lzf"
            seen[split] = set(f["frame"][:].tolist())
            i = int(f["frame"][0])
            assert any(
                np.array_equal(f["depth"][0], frames[i, y : y + 32, x : x + 32])
                for y in (0, 24, 48)
                for x in (0, 23, 45, 68)
            ), "tiles are crops of their frame"
    assert not (seen["train"] & seen["val"]) and not (seen["val"] & seen["test"]) and not (seen["train"] & seen["test"])
    assert len(seen["train"]) == 4 and len(seen["val"]) == len(seen["test"]) == 2
    score = train(
        make_cfg(
            "data=h5",
            f"data.train_path={tmp_path / 'tiles_train.h5'}",
            f"data.val_path={tmp_path / 'tiles_val.h5'}",
            f"data.test_path={tmp_path / 'tiles_test.h5'}",
            "trainer.max_epochs=1",
        )
    )
    assert score is not None


def test_convert_keeps_a_share_of_glint_free_tiles(tmp_path):
    _recordings(tmp_path / "rec.h5", n=6, h=128, w=128)
    counts = {}
    for keep in (0.0, 1.0):
        r = convert(_args(src=str(tmp_path / "rec.h5"), out=str(tmp_path / f"k{keep}.h5"), tile=32, keep_empty=keep))
        counts[keep] = sum(r["tiles"].values())
        with h5py.File(r["paths"]["train"]) as f:
            per_tile = f["mask"][:].reshape(len(f["mask"]), -1).max(1)
        assert keep == 1.0 or per_tile.all()
    assert counts[0.0] < counts[1.0] == 6 * 16


def test_convert_from_a_folder_of_png_and_npy(tmp_path):
    (tmp_path / "rec" / "depth").mkdir(parents=True)
    (tmp_path / "rec" / "mask").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        d, m, _ = synth_tile(rng, 64, glint_free=False)
        Image.fromarray(d.astype(np.uint16)).save(tmp_path / "rec" / "depth" / f"f{i}.png")
        if i % 2:
            np.save(tmp_path / "rec" / "mask" / f"f{i}.npy", m)
        else:
            Image.fromarray(m * 255).save(tmp_path / "rec" / "mask" / f"f{i}.png")
    r = convert(_args(src=str(tmp_path / "rec"), out=str(tmp_path / "t.h5"), tile=32, keep_empty=1.0, split=[1, 0, 0]))
    assert r["tiles"]["train"] == 16
    with h5py.File(r["paths"]["train"]) as f:
        assert set(np.unique(f["mask"][:])) <= {0, 1} and f["depth"][:].max() > 300
    (tmp_path / "rec" / "mask" / "f3.npy").unlink()
    with pytest.raises(GlintError, match=r"no mask for \['f3.png'\]"):
        convert(_args(src=str(tmp_path / "rec"), out=str(tmp_path / "u.h5"), tile=32))


def test_convert_bad_input(tmp_path):
    _recordings(tmp_path / "rec.h5", n=2, h=40, w=40)
    with pytest.raises(GlintError, match="smaller than tile=64"):
        convert(_args(src=str(tmp_path / "rec.h5"), out=str(tmp_path / "t.h5"), tile=64))
    assert not list(tmp_path.glob("t_*.h5")) and not list(tmp_path.glob(".t_*"))
    with pytest.raises(GlintError, match="no such file or folder"):
        convert(_args(src=str(tmp_path / "nope.h5"), out=str(tmp_path / "t.h5")))
    with pytest.raises(GlintError, match=r"no dataset 'depth' \(found \['frames', 'masks'\]\)"):
        convert(_args(src=str(tmp_path / "rec.h5"), out=str(tmp_path / "t.h5"), frames_key="depth"))
    with pytest.raises(GlintError, match="src is not set; e.g. glint-convert src="):
        convert(_args(out=str(tmp_path / "t.h5")))
