"""One contract test over every registered model (every conf/model/*.yaml), in the shape of smp's shared model
tester: any input size gives same-size 1-channel logits, the network is a SegmentationNetwork whose `stride` its
padded forward really needs, an auxiliary output only in training, and the export round trip (TorchScript, which
scripts the base's pad-forward-crop) reproduces the PyTorch logits. A GPU variant runs where CUDA exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from glint_lightning.export import export_torchscript
from glint_lightning.models.base import SegmentationNetwork, network_stride
from glint_lightning.models.common import check_network
from glint_lightning.module import GlintModule
from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import TINY_MODEL

MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
SIZES = [(1, 37, 50), (2, 64, 64), (1, 33, 95)]


def model_config(name: str) -> dict:
    """conf/model/<name>.yaml with the tiny overrides the other tests use."""
    if name == "smp":
        pytest.importorskip("segmentation_models_pytorch")
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{name}.yaml")
    overrides = OmegaConf.from_dotlist([o.removeprefix("model.") for o in TINY_MODEL.get(name, [])])
    return OmegaConf.to_container(OmegaConf.merge(cfg, overrides))


@pytest.fixture(params=MODELS)
def network(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    return request.param, instantiate(model_config(request.param)).eval()


def test_every_model_config_is_tested():
    assert set(MODELS) >= {"unet", "deeplabv3plus", "fcn", "smp"}, MODELS
    assert all(name in TINY_MODEL for name in MODELS), "give each model a tiny setting in tests/helpers.py"


def test_any_input_size_gives_same_size_single_channel_logits(network):
    name, net = network
    check_network(net, f"model={name}")
    for batch, h, w in SIZES:
        with torch.no_grad():
            out = net(torch.randn(batch, 1, h, w))
        assert isinstance(out, torch.Tensor) and out.shape == (batch, 1, h, w) and out.is_floating_point(), name


def test_the_base_holds_stride_pad_and_crop(network):
    name, net = network
    assert isinstance(net, SegmentationNetwork), f"{name} inherits the one network base"
    stride = network_stride(net)
    assert isinstance(stride, int) and stride >= 2 and stride == net.stride
    x = torch.randn(1, 1, 2 * stride + 5, 3 * stride - 1)
    with torch.no_grad():
        pad = [0, stride - x.shape[-1] % stride, 0, stride - x.shape[-2] % stride]  # both sizes are off a multiple
        padded = torch.nn.functional.pad(x, pad, "replicate")
        expected = net.forward_padded(padded)[..., : x.shape[-2], : x.shape[-1]]
        torch.testing.assert_close(net(x), expected)


def test_training_output_is_logits_or_a_dict_with_them(network):
    name, net = network
    out = net.train()(torch.randn(2, 1, 64, 64))
    logits = out["out"] if isinstance(out, dict) else out
    assert logits.shape == (2, 1, 64, 64)
    if isinstance(out, dict):
        assert set(out) <= {"out", "aux"} and out["aux"].shape == logits.shape
    logits.mean().backward()
    assert any(p.grad is not None for p in net.parameters())


def test_export_round_trip_matches_pytorch(network, tmp_path):
    name, net = network
    module = GlintModule(model=model_config(name), loss={"_target_": "glint_lightning.losses.BCELoss"}, optimizer={})
    module.set_depth_stats(1000.0, 200.0)
    diff = export_torchscript(module.eval(), tmp_path / f"{name}.pt", (45, 70))
    assert diff <= 1e-3, f"{name}: exported logits differ by {diff}"


@pytest.mark.gpu
def test_every_model_runs_on_the_gpu_in_bf16_channels_last(network):
    name, net = network
    net = net.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 45, 70, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    assert out.shape == (2, 1, 45, 70) and torch.isfinite(out.float()).all(), name
