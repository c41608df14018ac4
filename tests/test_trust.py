"""Nothing is built from a stored or user config unless every `_target_` is trusted: crafted checkpoints for each
loader, whose untrusted targets would write a marker file if anything called them. The console scripts run in
this process (their main() on the same command line): the payload would run here as well, and is watched for."""

from __future__ import annotations

import importlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from glint_lightning import ckpt_info, train
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.trust import check_targets, trust, untrusted_targets
from tests.helpers import TINY

PAYLOAD = "tests.payloads.write_marker"


def _craft(src: Path, dst: Path, *keys: str) -> Path:
    """A copy of checkpoint `src` whose stored config at each dotted key of hyper_parameters names the payload."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    for key in keys:
        node = ckpt["hyper_parameters"]
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = PAYLOAD
    torch.save(ckpt, dst)
    return dst


def _refused(res: tuple, tmp_path: Path, key: str) -> None:
    code, _, stderr = res
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert key in errors[0] and PAYLOAD in errors[0] and "trusted_targets" in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "marker").exists(), "the payload ran"


@pytest.fixture
def env(tmp_path, cache_dir):
    return {"GLINT_TEST_MARKER": str(tmp_path / "marker"), "GLINT_CACHE_DIR": str(cache_dir)}


@pytest.mark.parametrize(
    ("command", "key", "args"),
    [
        ("glint_lightning.eval", "optimizer._target_", []),  # a part eval never builds is refused all the same
        ("glint_lightning.predict", "loss._target_", ["input=frames.h5", "output=out.h5"]),
        ("glint_lightning.export", "scheduler.scheduler._target_", ["format=pth"]),
        ("glint_lightning.ckpt_info", "config.data._target_", []),
    ],
)
def test_tools_refuse_a_checkpoint_with_an_untrusted_target(tmp_path, env, run_main, trained_ckpt, command, key, args):
    crafted = _craft(trained_ckpt, tmp_path / "crafted.ckpt", key)
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = np.full((1, 40, 48), 1000.0, np.float32)
    ckpt_arg = [str(crafted)] if command.endswith("ckpt_info") else [f"ckpt_path={crafted}"]
    res = run_main(importlib.import_module(command).main, *ckpt_arg, *args, cwd=tmp_path, env=env)
    _refused(res, tmp_path, key)


@pytest.mark.slow
def test_train_refuses_untrusted_resume_and_pretrained_files(tmp_path, env, run_main, trained_ckpt):
    crafted = _craft(trained_ckpt, tmp_path / "crafted.ckpt", "model._target_")
    base = [*TINY, "trainer.max_epochs=2", "test=false", "hydra.run.dir=run"]
    res = run_main(train.main, *base, f"ckpt_path={crafted}", cwd=tmp_path, env=env)
    _refused(res, tmp_path, "hyper_parameters.model._target_")
    res = run_main(train.main, *base, f"model.pretrained={crafted}", cwd=tmp_path, env=env)
    _refused(res, tmp_path, "hyper_parameters.model._target_")
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt")), "nothing trained"


def test_train_refuses_an_untrusted_target_in_the_composed_config(tmp_path, env, run_main):
    res = run_main(train.main, *TINY, f"loss._target_={PAYLOAD}", cwd=tmp_path, env=env)
    _refused(res, tmp_path, "loss._target_")


def test_a_trusted_prefix_lets_the_users_own_code_build(tmp_path, env, run_main, trained_ckpt):
    """The same crafted file, trusted through the environment variable: then it is the user's own code and runs."""
    crafted = _craft(trained_ckpt, tmp_path / "crafted.ckpt", "config.data._target_")
    code, _, stderr = run_main(
        ckpt_info.main, str(crafted), cwd=tmp_path, env={**env, "GLINT_TRUSTED_TARGETS": "tests."}
    )
    assert code == 0, stderr[-3000:]


def test_targets_at_any_depth_lists_and_partials_are_checked():
    tree = {
        "model": {"_target_": "glint_lightning.models.UNet", "block": {"_target_": "torch.nn.ReLU"}},
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True},
        "extra": [{"x": {"_target_": "builtins.exec", "_partial_": True}}],
        "trainer": {"_target_": "lightning.pytorch.Trainer"},
    }
    assert untrusted_targets(tree, lightning_under=("trainer",)) == [("extra[0].x._target_", "builtins.exec")]
    assert ("trainer._target_", "lightning.pytorch.Trainer") in untrusted_targets(tree)  # not from a checkpoint
    with pytest.raises(GlintError, match=r"f.ckpt: extra\[0\].x._target_=builtins.exec is not a trusted target"):
        check_targets(tree, "f.ckpt", ("trainer",))
    # a prefix must match at a dot: "glint_lightningX." is not "glint_lightning."
    assert untrusted_targets({"_target_": "glint_lightningx.evil"}) == [("_target_", "glint_lightningx.evil")]


def test_trusted_targets_setting_adds_prefixes(monkeypatch):
    monkeypatch.setattr("glint_lightning.utils.trust._configured", ())
    tree = {"model": {"_target_": "mylab.nets.Net"}}
    assert untrusted_targets(tree)
    trust(["mylab."])
    assert untrusted_targets(tree) == []
    monkeypatch.setattr("glint_lightning.utils.trust._configured", ())
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "otherlab., mylab.")
    assert untrusted_targets(tree) == []
