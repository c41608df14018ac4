"""DeepLabV3+, FCN and smp models: shapes, strides, pretrained loading and the 1-channel adaptation."""

import urllib.error

import pytest
import torch
import torchvision.models as tvm

from glint_lightning.models import FCN, DeepLabV3Plus, SMPModel, UNet
from glint_lightning.models.backbones import Encoder
from glint_lightning.models.pretrained import adapt_input_conv, read_state_dict
from glint_lightning.utils.errors import GlintError

ODD = (49, 75)  # odd, and no multiple of any stride (8, 16, 32)


def _shape(net, size=ODD, cin=1):
    with torch.no_grad():
        return tuple(net.eval()(torch.randn(1, cin, *size)).shape)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_any_size(backbone, output_stride):
    net = DeepLabV3Plus(backbone, output_stride=output_stride, aspp_channels=32, decoder_channels=32)
    assert _shape(net) == (1, 1, *ODD)


@pytest.mark.parametrize(
    "backbone, variant",
    [
        *((b, v) for b in ("vgg16", "resnet18", "resnet50", "mobilenet_v2") for v in ("32s", "16s", "8s")),
        ("vgg16_bn", "8s"),  # vgg16's strides and skips plus norm layers (building a VGG takes seconds)
    ],
)
def test_fcn_any_size(backbone, variant):
    assert _shape(FCN(backbone, variant)) == (1, 1, *ODD)


@pytest.mark.parametrize(
    "net", [lambda: DeepLabV3Plus("resnet18", aux=True, norm="group"), lambda: FCN("resnet18", aux=True)]
)
def test_aux_head_only_in_training(net):
    net = net()
    out = net.train()(torch.randn(2, 1, *ODD))
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 1, *ODD)
    assert isinstance(net.eval()(torch.randn(1, 1, *ODD)), torch.Tensor)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v2"])
def test_output_stride_sets_encoder_strides(backbone):
    x = torch.randn(1, 1, 64, 64)
    expected = {32: [16, 8, 4, 2], 16: [16, 8, 4, 4], 8: [16, 8, 8, 8]}
    for output_stride, widths in expected.items():
        feats = Encoder(backbone, 1, output_stride).eval()(x)
        assert [f.shape[-1] for f in feats] == widths, output_stride


def _tv_features(tv, x):
    """Reference: the torchvision network's own layers on 3-channel input."""
    if isinstance(tv, tvm.ResNet):
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))
    return tv.features(x)


@pytest.mark.parametrize("name, ctor", [("resnet18", tvm.resnet18), ("mobilenet_v2", tvm.mobilenet_v2)])
@pytest.mark.parametrize("cin", [1, 6])
def test_rgb_weights_adapted_to_depth_input_give_the_same_features(tmp_path, capsys, name, ctor, cin, glint_log):
    torch.manual_seed(0)
    tv = ctor(weights=None).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)  # a local torchvision weights file ("pretrained", randomly initialised)
    net = FCN(name, "32s", in_channels=cin, pretrained=str(path)).eval()
    assert "adapted 1 (" in glint_log()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            net.backbone(x.repeat(1, cin, 1, 1))[-1], _tv_features(tv, x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name, ctor", [("vgg16", tvm.vgg16), ("vgg16_bn", tvm.vgg16_bn)])
def test_vgg_encoder_holds_torchvisions_features_by_name_and_initialisation(name, ctor):
    """The VGG body is built without torchvision's classifier; its weight files must still load by name."""
    with torch.device("meta"):  # torchvision's layout without paying for its 102M-parameter classifier
        tv = ctor(weights=None)
    torch.manual_seed(0)
    body = Encoder(name, in_channels=3).body
    expected = {k: v.shape for k, v in tv.state_dict().items() if k.startswith("features.")}
    assert {k: v.shape for k, v in body.state_dict().items()} == expected
    convs = [m for m in body.modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs[
        1:
    ]:  # torchvision's init: He (fan out) weights, zero bias (the input conv is rebuilt for in_channels)
        assert torch.count_nonzero(m.bias) == 0
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        assert m.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


def test_adapt_input_conv_rule():
    w = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    torch.testing.assert_close(adapt_input_conv(w, 6), torch.cat([w, w], 1) / 2)


def test_loading_keeps_matching_keys_and_reports_the_rest(tmp_path, capsys, glint_log):
    src = UNet(base_channels=4, depth=2)
    state = src.state_dict()
    state["head.weight"] = torch.randn(3, 4, 1, 1)  # wrong shape
    state["extra.weight"] = torch.randn(2)  # not in the model
    del state["inc.0.weight"]  # missing
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "model_state_dict": state}, path)  # the old script's checkpoint layout
    dst = UNet(base_channels=4, depth=2, pretrained=str(path))
    out = glint_log()
    assert f"pretrained {path}: loaded {len(state) - 2}," in out
    assert "skipped for shape 1 (head.weight)" in out and "missing 1 (inc.0.weight)" in out
    assert "unused 1 (extra.weight)" in out
    torch.testing.assert_close(dst.state_dict()["inc.1.weight"], src.state_dict()["inc.1.weight"])
    assert not torch.equal(dst.state_dict()["head.weight"][:1], state["head.weight"][:1])
    with pytest.raises(GlintError, match="model.strict=true"):
        UNet(base_channels=4, depth=2, pretrained=str(path), strict=True)


def test_lightning_checkpoint_and_plain_state_dict_sources(tmp_path):
    net = UNet(base_channels=4, depth=2)
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "a.ckpt")
    torch.save(net.state_dict(), tmp_path / "b.pth")
    for name in ("a.ckpt", "b.pth"):
        loaded = UNet(base_channels=4, depth=2, pretrained=str(tmp_path / name))
        for k, v in net.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(GlintError, match="no such file"):
        read_state_dict(tmp_path / "nope.pth")


def test_imagenet_offline_fails_with_a_clear_message(monkeypatch):
    def offline(self, *a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvm.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(
        GlintError, match=r"model.pretrained=imagenet: cannot download resnet18 .*model.pretrained=/path"
    ):
        DeepLabV3Plus("resnet18", pretrained="imagenet")
    with pytest.raises(GlintError, match="needs a torchvision backbone"):
        UNet(pretrained="imagenet")


def test_unknown_backbone_and_stride():
    with pytest.raises(GlintError, match="model.backbone=resnet7"):
        DeepLabV3Plus("resnet7")
    with pytest.raises(GlintError, match="supports output_stride=32 only"):
        Encoder("vgg16", 1, 16)
    with pytest.raises(ValueError, match="model.variant"):
        FCN("vgg16", "4s")


def test_smp_models_when_installed():
    pytest.importorskip("segmentation_models_pytorch")
    for arch in ("Unet", "UnetPlusPlus", "FPN"):
        assert _shape(SMPModel(arch, "resnet18"), size=(45, 70)) == (1, 1, 45, 70)
    with pytest.raises(GlintError, match="not known to smp"):
        SMPModel("Unet", "no-such-encoder")
