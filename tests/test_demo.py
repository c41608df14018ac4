import sys

import h5py
import numpy as np
import pytest

from glint_lightning.data.demo import cached_demo, demo_folder, make_demo
from glint_lightning.data.make_demo import main as make_demo_main
from tests.helpers import run_cli


def _read(path):
    with h5py.File(path) as f:
        return f["depth"][:], f["mask"][:], f["valid"][:]


def test_demo_is_deterministic_for_a_seed(tmp_path):
    a = make_demo(tmp_path / "a", 12, 4, 0, 32, seed=3)
    b = make_demo(tmp_path / "b", 12, 4, 0, 32, seed=3)
    c = make_demo(tmp_path / "c", 12, 4, 0, 32, seed=4)
    for x, y in zip(_read(a["train"]), _read(b["train"])):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(_read(a["train"])[0], _read(c["train"])[0])
    assert "test" not in a


def test_demo_tiles_look_like_glint_data(tmp_path):
    paths = make_demo(tmp_path / "d", 200, 0, 0, 48, seed=0)
    depth, mask, valid = _read(paths["train"])
    assert depth.shape == mask.shape == valid.shape == (200, 48, 48)
    assert depth.dtype == np.float32 and mask.dtype == np.uint8 and valid.dtype == bool
    assert set(np.unique(mask)) == {0, 1}
    per_tile = mask.reshape(200, -1).max(1)
    assert 0.05 < 1 - per_tile.mean() < 0.4, "some tiles, not most, are glint-free"
    assert 0.002 < mask.mean() < 0.08, "glints are small"
    assert np.all(depth[~valid] == 0), "dropout holes are depth 0"
    assert (~valid).any() and not (mask.astype(bool) & ~valid).any(), "dropout is invalid and never a glint"
    assert ((depth == 0) & valid & (mask == 1)).any(), "missing-depth glint spots are scored"
    surface = depth[valid & (mask == 0)]
    assert surface.min() > 200 and surface.max() < 4000, "surfaces in millimetres"


def test_cached_demo_generates_once(tmp_path):
    folder = cached_demo(tmp_path, 8, 4, 4, 32, 0)
    assert folder == demo_folder(tmp_path, 8, 4, 4, 32, 0)
    stamp = (folder / "train.h5").stat().st_mtime_ns
    assert cached_demo(tmp_path, 8, 4, 4, 32, 0) == folder
    assert (folder / "train.h5").stat().st_mtime_ns == stamp
    assert demo_folder(tmp_path, 8, 4, 4, 32, 1) != folder


@pytest.mark.slow
def test_make_demo_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    res = run_cli(
        "glint_lightning.data.make_demo",
        f"out={out}",
        "n_train=6",
        "n_val=2",
        "n_test=2",
        "tile=32",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert (out / "train.h5").is_file() and (out / "test.h5").is_file()
    assert str(out / "train.h5") in res.stdout
    monkeypatch.chdir(tmp_path)  # the refusal: the console script's main() in this process
    monkeypatch.setattr(sys, "argv", ["glint-make-demo", f"out={out}", "n_tiles=6"])
    with pytest.raises(SystemExit) as exit_:
        make_demo_main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error:") and "n_tiles" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "no outputs/, .hydra or log file in the cwd"
