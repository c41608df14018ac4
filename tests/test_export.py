"""export: the seed-style .pth, TorchScript and ONNX, each checked against the PyTorch model."""

import pytest
import torch
from hydra.utils import instantiate

from glint_lightning.module import GlintModule
from glint_lightning.train import train
from tests.conftest import run_cli


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
    net = instantiate({k: v for k, v in payload["model_config"].items() if k not in ("freeze", "unfreeze_at_epoch")})
    net.load_state_dict(payload["model_state_dict"])  # what train_glint_unet.py users do


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
    for fmt in ("torchscript", "onnx"):
        res = run_cli("glint_lightning.export", f"ckpt_path={ckpt}", f"format={fmt}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert float(res.stdout.rsplit("input: ", 1)[1]) < 1e-4
    assert (tmp_path / "run" / "checkpoints" / "last.onnx").is_file()


def test_export_bad_input(trained_ckpt, tmp_path):
    bad = run_cli("glint_lightning.export", f"ckpt_path={trained_ckpt}", "format=tflite", cwd=tmp_path)
    assert bad.returncode == 2 and "error: format=tflite; use pth, torchscript or onnx" in bad.stderr
    missing = run_cli("glint_lightning.export", "ckpt_path=nope.ckpt", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: nope.ckpt: no such file")
