"""Checkpoints survive a failed write, and files that would run code when unpickled are refused."""

import errno
import os

import pytest
import torch

import glint_lightning.checkpoint_io as checkpoint_io
from glint_lightning.errors import GlintError
from glint_lightning.models.pretrained import read_state_dict
from glint_lightning.resume import load_checkpoint
from glint_lightning.train import train
from tests.conftest import run_cli


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(make_cfg, tmp_path, monkeypatch):
    train(make_cfg("trainer.max_epochs=1", "test=false"))
    ckpts = tmp_path / "run" / "checkpoints"
    before = (ckpts / "last.ckpt").read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    with pytest.raises(GlintError, match=r"disk full while writing a checkpoint; the previous checkpoints are intact"):
        train(make_cfg("trainer.max_epochs=2", "test=false", "ckpt_path=last"))
    assert (ckpts / "last.ckpt").read_bytes() == before
    assert not [p.name for p in ckpts.iterdir() if ".tmp-" in p.name], "no temporary files pile up"
    monkeypatch.undo()
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_truncated_checkpoint_is_refused_with_one_line_and_left_alone(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1", "test=false"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    before = sorted((p.name, p.read_bytes()) for p in last.parent.iterdir())
    with pytest.raises(GlintError, match=r"last\.ckpt: not a loadable checkpoint .*; pass a \.ckpt written by"):
        train(make_cfg("trainer.max_epochs=2", "test=false", "ckpt_path=last"))
    assert sorted((p.name, p.read_bytes()) for p in last.parent.iterdir()) == before


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_files_that_need_arbitrary_unpickling_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "extra": _Payload(marker)}, path)
    with pytest.raises(GlintError, match=r"evil.ckpt: not a loadable checkpoint \(Weights only load failed"):
        load_checkpoint(path)
    with pytest.raises(GlintError, match=r"evil.ckpt: not a weights file torch.load\(weights_only=True\) accepts"):
        read_state_dict(path)
    res = run_cli("glint_lightning.ckpt_info", str(path), cwd=tmp_path)
    assert res.returncode == 2 and "not a loadable checkpoint" in res.stderr
    assert not marker.exists(), "the payload never ran"
    torch.load(path, weights_only=False)  # what an unsafe loader would do: the payload runs
    assert marker.exists()
