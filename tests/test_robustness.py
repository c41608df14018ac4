"""Checkpoints survive a failed write, and files that would run code when unpickled are refused."""

import errno
import os

import pytest
import torch

import glint_lightning.checkpoints.io as checkpoint_io
from glint_lightning.checkpoints.reader import load_checkpoint
from glint_lightning.models.pretrained import read_state_dict
from glint_lightning.train import train
from glint_lightning.utils.errors import GlintError, exit_on_user_error
from tests.helpers import run_cli


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
    with pytest.raises(GlintError, match=r"evil.ckpt: not a loadable weights file \(Weights only load failed"):
        read_state_dict(path)
    res = run_cli("glint_lightning.ckpt_info", str(path), cwd=tmp_path)
    assert res.returncode == 2 and "not a loadable checkpoint" in res.stderr
    assert not marker.exists(), "the payload never ran"
    torch.load(path, weights_only=False)  # what an unsafe loader would do: the payload runs
    assert marker.exists()


@pytest.mark.parametrize(
    "args, line",
    [
        (["model.init=he"], "error: model.init='he'; use kaiming or xavier"),
        (["model.upsample=nearest"], "error: model.upsample='nearest'; use transpose or bilinear"),
        (
            ["model.out_channels=2"],
            "error: model.out_channels=2: glint masks are binary, so a network gives one logit per pixel (the losses "
            "and metrics take (B, 1, H, W) logits); use model.out_channels=1",
        ),
        (
            ["+model.colour=red"],
            "error: model: UNet.__init__() got an unexpected keyword argument 'colour'; fix the key "
            "(python -m glint_lightning.train --cfg job shows the config)",
        ),
        (["model.strict=true", "model.pretrained={weights}"], "error: model.strict=true but the weights do not match"),
        (
            ["ckpt_path={ckpt}", "trainer.max_epochs=1"],
            "error: {ckpt}: the checkpoint holds 1 finished epoch (global step 6), so trainer.max_epochs=1 leaves "
            "nothing to train; pass trainer.max_epochs=2 or more to train longer",
        ),
    ],
    ids=["init", "upsample", "out_channels", "unknown-key", "strict", "max_epochs"],
)
def test_user_mistakes_reach_the_user_as_one_line(make_cfg, tmp_path, trained_ckpt, args, line, capsys, monkeypatch):
    """glint-train's task under the app's error handling, in this process (the console script's own exit 2 and
    one line: tests/test_console_scripts.py)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    weights = tmp_path / "other.pth"
    torch.save({"inc.0.weight": torch.zeros(3, 1, 3, 3)}, weights)
    args = [a.format(weights=weights, ckpt=trained_ckpt) for a in args]
    cfg = make_cfg("test=false", *args)
    with pytest.raises(SystemExit) as exit_, exit_on_user_error():
        train(cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(line.format(ckpt=trained_ckpt))
    assert not (tmp_path / "run" / "checkpoints").exists()
