import pytest
import torch

from glint_lightning.models import UNet


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"norm": "group", "upsample": "bilinear"},
        {"norm": "none", "init": "xavier", "dropout": 0.2},
        {"depth": 1, "in_channels": 3},
    ],
)
@pytest.mark.parametrize("size", [(32, 32), (37, 53), (97, 131)])
def test_unet_any_size_gives_input_sized_logits(kw, size):
    cin = kw.get("in_channels", 1)
    net = UNet(base_channels=4, depth=kw.pop("depth", 3), **kw)
    x = torch.randn(2, cin, *size)
    y = net(x)
    assert y.shape == (2, 1, *size)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_unet_padding_does_not_leak_into_the_crop():
    net = UNet(base_channels=4, depth=2).eval()
    x = torch.randn(1, 1, 33, 33)
    torch.testing.assert_close(net(x), net(x.clone()))
    assert net(x).shape[-2:] == (33, 33)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"norm": "layer"}, "model.norm"),
        ({"upsample": "nearest"}, "model.upsample"),
        ({"init": "normal"}, "model.init"),
        ({"depth": 0}, "model.depth"),
    ],
)
def test_unet_rejects_unknown_options(kw, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kw)
