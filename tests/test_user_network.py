"""A user's own network (a plain nn.Module: no forward_padded, maybe no stride) meets the contract in
models/common.py and exports in every format; a network that breaks the contract is refused with one line."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from glint_lightning.export import export
from glint_lightning.inference.loading import load_module
from glint_lightning.models.base import pad_to_multiple
from glint_lightning.models.common import check_network
from glint_lightning.module import GlintModule
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.trust import UntrustedTarget
from tests.helpers import run_cli

HERE = "tests.test_user_network"


class PlainNet(nn.Module):
    """Declares no stride: any size works."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PooledNet(nn.Module):
    """Declares stride 4 and does not pad: other sizes give the wrong output size. Returns {"out": logits}."""

    stride = 4

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.up = nn.ConvTranspose2d(width, 1, 4, stride=4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.up(self.enc(x))}


class SizeDependent(PlainNet):
    """Uses its input's width as a number: a trace records the example's width as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + float(x.shape[-1]) / 10


class ZeroStride(PlainNet):
    stride = 0


class TwoChannels(PlainNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).repeat(1, 2, 1, 1)


class Broken(PlainNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("expected 3 channels\nsecond line")


class NoOut(PlainNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": super().forward(x)}


@pytest.mark.parametrize(
    "net, message",
    [
        (ZeroStride(), "stride=0; a network's stride must be a positive int"),
        (TwoChannels(), "returned shape (2, 2, 2, 2) for a (2, 1, 2, 2) input"),
        (Broken(), "forward failed on a (2, 1, 2, 2) input (RuntimeError: expected 3 channels); "),
        (NoOut(), "returned a dict without 'out'"),
    ],
)
def test_check_network_names_the_target_and_the_problem(net, message):
    with pytest.raises(GlintError) as err:
        check_network(net, "model._target_=mylab.Net")
    assert str(err.value).startswith("model._target_=mylab.Net: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_check_network_accepts_ours_and_plain_modules_and_keeps_the_mode():
    for net in (PlainNet(), PooledNet(), nn.Conv2d(1, 1, 1)):
        net.train()
        check_network(net, "model")
        assert net.training


def _checkpoint(path: Path, target: str) -> Path:
    """A checkpoint as glint-train writes it, of an untrained network of class `target`."""
    module = GlintModule(
        model={"_target_": target, "width": 4},
        loss={"_target_": "glint_lightning.losses.BCELoss"},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
        tile_size=[32, 32],
    )
    module.set_depth_stats(1000.0, 300.0)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, path)
    return path


def _export(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return export(compose("export", overrides=list(overrides)))


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "torchscript", "onnx"])
def test_a_user_network_without_forward_padded_exports(tmp_path, monkeypatch, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "tests.")
    ckpt = _checkpoint(tmp_path / "pooled.ckpt", f"{HERE}.PooledNet")
    r = _export(f"ckpt_path={ckpt}", f"format={fmt}", f"out={tmp_path / ('m.' + fmt)}")
    assert r["max_abs_diff"] < 1e-4 and r["check_size"] == (97, 131)  # not a multiple of 4: padded inside
    if fmt == "torchscript":
        module = GlintModule.from_checkpoint(str(ckpt))
        depth, valid = torch.rand(3, 1, 45, 70) * 800 + 600, torch.rand(3, 1, 45, 70) > 0.1
        x = torch.where(valid, (depth - 1000.0) / 300.0, 0.0)
        with torch.no_grad():
            expected = module.model(pad_to_multiple(x, 4))["out"][..., :45, :70]  # the padding the contract asks
            got = torch.jit.load(r["out"])(depth, valid)
        torch.testing.assert_close(got, expected)
    if fmt in ("pth", "safetensors"):
        assert type(load_module(r["out"]).model).__name__ == "PooledNet"


@pytest.mark.slow
def test_a_network_without_stride_exports_through_the_cli_once_trusted(tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt = _checkpoint(tmp_path / "plain.ckpt", f"{HERE}.PlainNet")
    with pytest.raises(UntrustedTarget, match=rf"model._target_={HERE}.PlainNet is not a trusted target"):
        _export(f"ckpt_path={ckpt}", "format=onnx", f"out={tmp_path / 'refused.onnx'}")
    assert not (tmp_path / "refused.onnx").exists()
    trusted = "trusted_targets=[tests.]"
    res = run_cli("glint_lightning.export", f"ckpt_path={ckpt}", "format=onnx", trusted, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.rsplit("input: ", 1)[1]) < 1e-4 and (tmp_path / "plain.onnx").is_file()


def test_export_refuses_a_network_that_breaks_the_contract_before_writing(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "two.ckpt", f"{HERE}.TwoChannels")
    with pytest.raises(UntrustedTarget):
        _export(f"ckpt_path={ckpt}", "format=pth")
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "tests.")
    with pytest.raises(GlintError, match=rf"model._target_={HERE}.TwoChannels: returned shape \(2, 2, 2, 2\)"):
        _export(f"ckpt_path={ckpt}", "format=pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.ckpt"]


def test_an_export_that_does_not_match_pytorch_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "tests.")
    ckpt = _checkpoint(tmp_path / "size.ckpt", f"{HERE}.SizeDependent")
    with pytest.raises(
        GlintError, match=r"m.pt: its logits differ from PyTorch's by 9.9.e\+00 on a 97x131 input, so it"
    ):
        _export(f"ckpt_path={ckpt}", "format=torchscript", f"out={tmp_path / 'm.pt'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["size.ckpt"]
