"""export: the seed-style .pth, safetensors with a JSON sidecar, TorchScript and ONNX, each checked against the
PyTorch model; .pth and .safetensors exports load wherever a checkpoint does, and only when trusted."""

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from glint_lightning.checkpoints.reader import network_config
from glint_lightning.export import export
from glint_lightning.inference.loading import load_module
from glint_lightning.models.pretrained import read_state_dict
from glint_lightning.module import GlintModule
from glint_lightning.train import train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import run_cli


class Marker(nn.Module):
    """What a crafted sidecar would build: if it is ever built, $GLINT_TEST_MARKER appears."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        Path(os.environ.get("GLINT_TEST_MARKER", "marker")).write_text("built")


def _inputs(module, size):
    g = torch.Generator().manual_seed(1)
    depth = module.depth_mean + module.depth_std * torch.randn(3, 1, *size, generator=g)
    return depth, torch.rand(3, 1, *size, generator=g) > 0.1


def test_pth_has_the_old_scripts_keys_and_loads_into_the_network(trained_ckpt, tmp_path):
    res = run_cli("glint_lightning.export", f"ckpt_path={trained_ckpt}", "format=pth", "out=m.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote m.pth (pth); max abs diff vs PyTorch on a 97x131 input: 0.00e+00" in res.stdout
    payload = torch.load(tmp_path / "m.pth", weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "train_args", "metrics", "timestamp"} <= set(payload)
    assert payload["train_args"]["model"] == payload["model_config"] and payload["depth_std"] > 1
    net = instantiate(network_config(payload["model_config"]))
    net.load_state_dict(payload["model_state_dict"])  # what train_glint_unet.py users do
    assert payload["tile_size"] == [32, 32] and payload["loss_config"]["_target_"].startswith("glint_lightning.")
    module, loaded = GlintModule.from_checkpoint(str(trained_ckpt)), load_module(tmp_path / "m.pth")
    depth, valid = _inputs(module, (40, 56))
    with torch.no_grad():
        torch.testing.assert_close(loaded(depth, valid), module(depth, valid), atol=0, rtol=0)
    assert loaded.hparams.threshold == module.hparams.threshold and loaded.hparams.tile_size == [32, 32]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_match_pytorch_for_any_batch_and_size(trained_ckpt, tmp_path, fmt):
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
    res = run_cli("glint_lightning.export", f"ckpt_path={trained_ckpt}", f"format={fmt}", f"out=m.{fmt}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.rsplit("input: ", 1)[1])
    assert diff < 1e-4
    module = GlintModule.from_checkpoint(str(trained_ckpt))
    for size in [(32, 32), (45, 70)]:
        depth, valid = _inputs(module, size)
        with torch.no_grad():
            expected = module(depth, valid)
        if fmt == "torchscript":
            got = torch.jit.load(str(tmp_path / "m.torchscript"))(depth, valid)
        else:
            session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"depth": depth.numpy(), "valid": valid.numpy()})[0])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deeplabv3plus", "fcn"])
def test_backbone_models_export_too(make_cfg, tmp_path, model):
    pytest.importorskip("onnxruntime")
    train(make_cfg(f"model={model}", "trainer.max_epochs=1", "test=false", "model.aux=true"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for fmt in ("torchscript", "onnx"):  # glint-export's task in this process (its command line: tests below)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("export", overrides=[f"ckpt_path={ckpt}", f"format={fmt}"])
        assert export(cfg)["max_abs_diff"] < 1e-4
    assert (tmp_path / "run" / "checkpoints" / "last.onnx").is_file()


def test_export_bad_input(trained_ckpt, tmp_path):
    bad = run_cli("glint_lightning.export", f"ckpt_path={trained_ckpt}", "format=tflite", cwd=tmp_path)
    assert bad.returncode == 2 and "error: format=tflite; use pth, torchscript, onnx, safetensors" in bad.stderr
    missing = run_cli("glint_lightning.export", "ckpt_path=nope.ckpt", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: nope.ckpt: no such file")


@pytest.fixture(scope="module")
def exported(trained_ckpt, tmp_path_factory) -> tuple[Path, str]:
    """trained_ckpt exported by glint-export format=safetensors: the folder and what the command printed."""
    folder = tmp_path_factory.mktemp("safetensors")
    res = run_cli("glint_lightning.export", f"ckpt_path={trained_ckpt}", "format=safetensors", "out=m.safetensors",
                  cwd=folder)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return folder, res.stdout


def _copy(exported, to: Path) -> Path:
    for name in ("m.safetensors", "m.json"):
        shutil.copy(exported[0] / name, to / name)
    return to / "m.safetensors"


def _frames(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["frames"] = np.random.default_rng(0).uniform(600, 1400, (2, 45, 70)).astype(np.float32)
    return path


def _prob(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["prob"][:]


def test_safetensors_round_trip_predicts_as_the_checkpoint(trained_ckpt, exported, tmp_path):
    assert (
        "wrote m.safetensors and m.json (safetensors); max abs diff vs PyTorch on a 97x131 input: 0.00e+00"
        in (exported[1])
    )
    meta = json.loads((exported[0] / "m.json").read_text())
    stored = torch.load(trained_ckpt, weights_only=True)
    assert meta["model_config"] == stored["hyper_parameters"]["model"] and meta["tile_size"] == [32, 32]
    assert meta["threshold"] == stored["hyper_parameters"]["threshold"] and meta["epoch"] == stored["epoch"]
    assert meta["depth_std"] > 1 and "val/iou" in meta["metrics"] and meta["weights"] == "m.safetensors"
    _copy(exported, tmp_path)
    _frames(tmp_path / "frames.h5")
    for name, model in (("ckpt", trained_ckpt), ("st", "m.safetensors")):
        res = run_cli("glint_lightning.predict", f"ckpt_path={model}", "input=frames.h5", f"output={name}.h5",
                      cwd=tmp_path)  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(_prob(tmp_path / "st.h5"), _prob(tmp_path / "ckpt.h5"))


def test_safetensors_load_without_any_unpickler(trained_ckpt, exported, tmp_path, monkeypatch):
    weights = _copy(exported, tmp_path)
    module = GlintModule.from_checkpoint(str(trained_ckpt))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("an unpickler ran")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = load_module(weights)
    state = read_state_dict(weights)  # model.pretrained=m.safetensors
    monkeypatch.undo()
    assert state.keys() == module.model.state_dict().keys()
    depth, valid = _inputs(module, (32, 48))
    with torch.no_grad():
        torch.testing.assert_close(loaded(depth, valid), module(depth, valid), atol=0, rtol=0)

    (tmp_path / "m.json").rename(tmp_path / "elsewhere.json")
    assert read_state_dict(weights).keys() == state.keys(), "tensors from anywhere load as weights"
    with pytest.raises(GlintError, match=r"m.safetensors: no sidecar .*m.json"):
        load_module(weights)


def test_a_sidecar_naming_untrusted_code_is_refused_before_anything_is_built(exported, tmp_path):
    weights = _copy(exported, tmp_path)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["model_config"]["_target_"] = "tests.test_export.Marker"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    _frames(tmp_path / "frames.h5")
    env = {"GLINT_TEST_MARKER": str(tmp_path / "marker")}
    res = run_cli("glint_lightning.predict", "ckpt_path=m.safetensors", "input=frames.h5", "output=out.h5",
                  cwd=tmp_path, env=env)  # fmt: skip
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: m.json: model_config._target_=tests.test_export.Marker is not a trusted")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out.h5").exists()
    with pytest.raises(GlintError, match="is not a trusted target"):
        read_state_dict(weights)  # as model.pretrained: not used at all
