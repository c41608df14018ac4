"""Stride-aligned windows (window mode agrees with one whole-frame pass), the batched blend, test-time augmentation
and the channels_last switch of full-frame inference."""

import math

import pytest
import torch
from torch import nn

from glint_lightning.data.windows import padded_length, window_starts
from glint_lightning.inference.frames import FramePredictor, gaussian_importance, pad_frame
from glint_lightning.module import GlintModule
from glint_lightning.scoring import tta_transforms
from glint_lightning.utils.errors import GlintError
from tests.helpers import pointwise_module


def unet(depth: int = 3, seed: int = 0) -> GlintModule:
    """A tiny U-Net (base 4; stride 2**depth) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    module = GlintModule(
        model={"_target_": "glint_lightning.models.UNet", "base_channels": 4, "depth": depth},
        loss={"_target_": "glint_lightning.losses.BCELoss"},
        optimizer={"_target_": "torch.optim.Adam"},
    )
    module.set_depth_stats(1000.0, 300.0)
    return module.eval()


def scene(height: int, width: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothly varying depth (mm), as a camera sees it, with a few invalid pixels."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.avg_pool2d(torch.randn(1, 1, height + 8, width + 8, generator=gen), 9, 1)[0, 0]
    return 1000 + 300 * noise / noise.std(), torch.rand(height, width, generator=gen) > 0.05


def old_starts(length: int, window: int, overlap: float) -> list[int]:
    """The window starts before stride alignment: spread evenly at any offset (0, 27, 54, 82, ... for 64 px)."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


@torch.no_grad()
def loop_blend(module, depth, valid, window: int, ys: list[int], xs: list[int], size: tuple[int, int]):
    """Reference blend, one window at a time: the frame padded to `size`, the gaussian-weighted mean of the windows'
    probabilities at each pixel, cropped back."""
    d, v = pad_frame(depth, *size), pad_frame(valid, *size)
    w = gaussian_importance(window, window)
    total, norm = torch.zeros(size), torch.zeros(size)
    for y in ys:
        for x in xs:
            cut = (slice(None), slice(None), slice(y, y + window), slice(x, x + window))
            prob = torch.sigmoid(module(d[None, None][cut], v[None, None][cut]))[0, 0]
            total[y : y + window, x : x + window] += prob * w
            norm[y : y + window, x : x + window] += w
    return (total / norm)[: depth.shape[0], : depth.shape[1]]


@pytest.mark.parametrize(
    "length, window, overlap, stride",
    [(70, 48, 0.5, 8), (95, 48, 0.5, 8), (700, 64, 0.5, 8), (1000, 64, 0.5, 8), (1000, 256, 0.25, 16),
     (20, 32, 0.5, 4), (64, 64, 0.5, 8), (100, 32, 0.0, 4), (50, 16, 0.9, 8)],
)  # fmt: skip
def test_every_window_starts_on_the_stride_and_the_windows_cover_the_padded_frame(length, window, overlap, stride):
    starts = window_starts(length, window, overlap, stride)
    padded = padded_length(length, window, stride)
    assert padded % stride == 0 and padded >= max(length, window)
    assert all(s % stride == 0 for s in starts), starts
    assert starts[0] == 0 and starts[-1] + window == padded
    assert all(0 < b - a <= max(stride, window * (1 - overlap)) for a, b in zip(starts, starts[1:])), starts
    covered = torch.zeros(padded, dtype=torch.bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()


def test_stride_one_keeps_the_old_even_spread_and_a_window_off_the_stride_is_refused():
    assert window_starts(1000, 64, 0.5) == old_starts(1000, 64, 0.5)  # data/convert.py's tiles stay where they were
    assert window_starts(1000, 64, 0.5)[:4] == [0, 31, 62, 94]  # off the U-Net's stride of 8: what misaligned it
    assert window_starts(1000, 64, 0.5, 8)[:4] == [0, 32, 64, 96]
    with pytest.raises(ValueError, match="window=60, stride=8"):
        window_starts(100, 60, 0.5, 8)


def test_the_predictor_aligns_its_windows_to_the_network_stride():
    module = unet(depth=3)
    predictor = FramePredictor(module, (44, 44))
    assert predictor.stride == 8 and predictor.window == (48, 48), "rounded up: the network pads to 48 anyway"
    geo = predictor.geometry(70, 95)
    assert geo.size == (72, 96)
    ys, xs = geo.starts // geo.size[1], geo.starts % geo.size[1]
    assert (ys % 8 == 0).all() and (xs % 8 == 0).all()
    assert sorted(set(ys.tolist())) == window_starts(70, 48, 0.5, 8)
    assert sorted(set(xs.tolist())) == window_starts(95, 48, 0.5, 8)


def test_window_mode_agrees_with_full_mode_on_a_unet_and_did_not_with_uneven_starts():
    module = unet(depth=3)  # stride 8
    depth, valid = scene(70, 95)
    full = FramePredictor(module, (48, 48), mode="full")(depth, valid)
    window = FramePredictor(module, (48, 48))(depth, valid)
    assert (window - full).abs().mean() <= 0.01
    # the batched gather / index_add blend is the plain per-window blend
    size = (padded_length(70, 48, 8), padded_length(95, 48, 8))
    ys, xs = window_starts(70, 48, 0.5, 8), window_starts(95, 48, 0.5, 8)
    torch.testing.assert_close(window, loop_blend(module, depth, valid, 48, ys, xs, size))
    # the same blend with the old starts (not multiples of 8) disagrees with the whole-frame pass: the test can fail
    uneven = loop_blend(module, depth, valid, 48, old_starts(70, 48, 0.5), old_starts(95, 48, 0.5), (70, 95))
    assert (uneven - full).abs().mean() > 0.02


def test_window_mode_agrees_with_full_mode_on_a_trained_checkpoint(trained_ckpt):
    module = GlintModule.from_checkpoint(str(trained_ckpt))  # U-Net depth 2 (stride 4), trained on 32 px tiles
    depth, valid = scene(70, 95)
    full = FramePredictor(module, (32, 32), mode="full")(depth, valid)
    assert (FramePredictor(module, (32, 32))(depth, valid) - full).abs().mean() <= 0.01


@pytest.mark.parametrize("mode", ["window", "full"])
@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_tta_of_a_pointwise_network_changes_nothing(mode, tta):
    module = pointwise_module(0.8, -0.3)  # logit = 0.8 x normalised depth - 0.3 at each pixel: flip-equivariant
    depth, valid = torch.rand(70, 95) * 800 + 600, torch.rand(70, 95) > 0.1
    plain = FramePredictor(module, (32, 32), mode=mode)(depth, valid)
    torch.testing.assert_close(FramePredictor(module, (32, 32), mode=mode, tta=tta)(depth, valid), plain)


def test_tta_averages_the_probabilities_of_the_transformed_frames():
    module = unet(depth=3)
    plain = FramePredictor(module, (48, 48), mode="full")
    # full mode, flip, a frame of multiples of the stride (no padding to move): the mean of the 4 flipped passes
    depth, valid = scene(64, 88)
    flips = [(), (1,), (0,), (0, 1)]
    by_hand = sum(plain(depth.flip(f), valid.flip(f)).flip(f) for f in flips) / 4
    tta = FramePredictor(module, (48, 48), mode="full", tta="flip")(depth, valid)
    torch.testing.assert_close(tta, by_hand)
    assert (tta - plain(depth, valid)).abs().max() > 1e-3, "a random U-Net is not flip-invariant: TTA does something"
    # window mode, d4, a 96x96 frame whose windows (0, 24, 48) map onto each other under the 8 symmetries: the mean
    # of the window-mode predictions of the 8 transformed frames
    depth, valid = scene(96, 96)
    windows = FramePredictor(module, (48, 48))
    by_hand = sum(inv(windows(fwd(depth), fwd(valid))) for fwd, inv in tta_transforms("d4")) / 8
    torch.testing.assert_close(FramePredictor(module, (48, 48), tta="d4")(depth, valid), by_hand)


def test_tta_transforms_are_the_flips_and_the_dihedral_group():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert len(tta_transforms("none")) == 1 and len(tta_transforms("flip")) == 4
    images = set()
    for fwd, inv in tta_transforms("d4"):
        torch.testing.assert_close(inv(fwd(x)), x)
        images.add(tuple(fwd(x).flatten().tolist()) + tuple(fwd(x).shape))
    assert len(images) == 8
    assert all(fwd(x).shape == x.shape for fwd, _ in tta_transforms("flip"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tta": "d8"}, "tta=d8; use none, flip or d4"),
        ({"tta": "d4", "window": (32, 48)}, "tta=d4 rotates windows by 90 degrees, which needs square ones"),
        ({"mode": "tiles"}, "mode=tiles; use window or full"),
        ({"overlap": 1.0}, r"overlap=1.0; use a value in \[0, 1\)"),
        ({"precision": "8"}, "precision=8; use 32, bf16 or 16"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_options_are_user_errors(kwargs, message):
    window = kwargs.pop("window", (32, 32))
    with pytest.raises(GlintError, match=message):
        FramePredictor(pointwise_module(1.0, 0.0), window, **kwargs)


def test_d4_in_full_mode_takes_a_non_square_frame():
    module = unet(depth=2)
    depth, valid = scene(36, 52)  # padded to 36x52 (stride 4); rotated, 52x36
    prob = FramePredictor(module, (32, 32), mode="full", tta="d4")(depth, valid)
    assert prob.shape == (36, 52) and torch.isfinite(prob).all()


def test_the_importance_map_is_cached_but_each_caller_gets_its_own():
    a = gaussian_importance(48, 48)
    a.zero_()
    assert gaussian_importance(48, 48).max() == pytest.approx(1.0)


class _FlattensActivations(nn.Module):
    """A network whose forward breaks on channels_last activations (it views channels and rows as one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.view(y.shape[0], -1).view_as(y)[:, :1]


def test_channels_last_keeps_the_values_and_is_skipped_for_a_network_that_refuses_it():
    module = unet(depth=3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    depth, valid = scene(70, 95)
    contiguous = FramePredictor(module, (48, 48), channels_last=False)(depth, valid)
    predictor = FramePredictor(module, (48, 48))
    assert predictor.channels_last and module.model.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(predictor(depth, valid), contiguous, atol=1e-5, rtol=0)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)

    odd = pointwise_module(1.0, 0.0)
    odd.model = _FlattensActivations()
    predictor = FramePredictor(odd, (32, 32))
    assert not predictor.channels_last and odd.model.conv.weight.is_contiguous()
    assert predictor(depth, valid).shape == (70, 95)
