import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from glint_lightning.losses import BCELoss, DiceLoss, FocalLoss, HybridLoss, TverskyLoss

ALL_LOSSES = {
    "bce": lambda: BCELoss(pos_weight=3.0),
    "focal": lambda: FocalLoss(alpha=0.25, gamma=2.0),
    "dice": lambda: DiceLoss(),
    "dice_per_image": lambda: DiceLoss(per_image=True),
    "tversky": lambda: TverskyLoss(alpha=0.3, beta=0.7),
    "hybrid": lambda: HybridLoss({"focal": FocalLoss(), "dice": DiceLoss()}, {"focal": 2.0, "dice": 0.5}),
}


def _data(seed=0, shape=(3, 1, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    target = (torch.rand(shape, generator=g) < 0.1).float()
    valid = torch.rand(shape, generator=g) > 0.2
    return logits, target, valid


def test_focal_matches_torchvision_on_all_and_on_valid_pixels():
    logits, target, valid = _data()
    all_valid = torch.ones_like(valid)
    for alpha, gamma in [(0.25, 2.0), (0.5, 0.0), (-1, 1.5)]:
        ours = FocalLoss(alpha, gamma)
        ref = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="mean")
        torch.testing.assert_close(ours(logits, target, all_valid), ref)
        ref_valid = sigmoid_focal_loss(logits[valid], target[valid], alpha=alpha, gamma=gamma, reduction="mean")
        torch.testing.assert_close(ours(logits, target, valid), ref_valid)


def test_focal_formula_by_hand():
    logits, target = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    torch.testing.assert_close(FocalLoss()(logits, target, torch.ones(3, dtype=torch.bool)), expected)


def test_bce_pos_weight_matches_torch_on_valid_pixels():
    logits, target, valid = _data(1)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[valid], target[valid], pos_weight=torch.tensor(3.0)
    )
    torch.testing.assert_close(BCELoss(pos_weight=3.0)(logits, target, valid), ref)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_invalid_pixels_never_change_loss_or_gradient(name):
    loss_fn = ALL_LOSSES[name]()
    logits, target, valid = _data(2)
    other_logits = logits.clone()
    other_logits[~valid] = torch.tensor([float("nan"), float("inf"), -1e4, 50.0]).repeat(100)[: (~valid).sum()]
    other_target = target.clone()
    other_target[~valid] = 1 - other_target[~valid]
    a = logits.clone().requires_grad_()
    b = other_logits.clone().requires_grad_()
    la, lb = loss_fn(a, target, valid), loss_fn(b, other_target, valid)
    la.backward()
    lb.backward()
    assert torch.isfinite(lb)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.all(b.grad[~valid] == 0)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_finite_on_batches_without_glints_and_lower_for_better_predictions(name):
    loss_fn = ALL_LOSSES[name]()
    target = torch.zeros(2, 1, 8, 8)
    valid = torch.ones_like(target, dtype=torch.bool)
    good, bad = (
        loss_fn(torch.full_like(target, -6.0), target, valid),
        loss_fn(torch.full_like(target, 6.0), target, valid),
    )
    assert torch.isfinite(good) and torch.isfinite(bad) and good < bad
    target[0, 0, 2:4, 2:4] = 1
    perfect = torch.where(target.bool(), 12.0, -12.0)
    assert loss_fn(perfect, target, valid) < loss_fn(-perfect, target, valid)


def test_dice_and_tversky_values():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1
    valid = torch.ones_like(target, dtype=torch.bool)
    perfect = torch.where(target.bool(), 30.0, -30.0)
    assert DiceLoss(smooth=0.0)(perfect, target, valid) == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(2, 1, 4, 4)  # p = 0.5 everywhere: tp = 2, fp = 14, fn = 2
    assert DiceLoss(smooth=0.0)(half, target, valid) == pytest.approx(1 - 4 / (4 + 14 + 2))
    assert TverskyLoss(0.3, 0.7, smooth=0.0)(half, target, valid) == pytest.approx(1 - 2 / (2 + 0.3 * 14 + 0.7 * 2))
    logits, target, valid = _data(3)
    torch.testing.assert_close(TverskyLoss(0.5, 0.5)(logits, target, valid), DiceLoss()(logits, target, valid))


def test_batch_dice_counts_tiny_glints_differently_from_per_image():
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 0, 0] = 1  # one tiny glint in one tile, none in the other
    valid = torch.ones_like(target, dtype=torch.bool)
    logits = torch.full_like(target, -3.0)
    assert DiceLoss(per_image=False)(logits, target, valid) != DiceLoss(per_image=True)(logits, target, valid)


def test_hybrid_is_the_weighted_sum_of_its_terms():
    logits, target, valid = _data(4)
    hybrid = ALL_LOSSES["hybrid"]()
    expected = 2.0 * FocalLoss()(logits, target, valid) + 0.5 * DiceLoss()(logits, target, valid)
    torch.testing.assert_close(hybrid(logits, target, valid), expected)
    assert set(hybrid.last_terms) == {"focal", "dice"}
    with pytest.raises(ValueError, match="loss.weights names \\['bce'\\]"):
        HybridLoss({"focal": FocalLoss()}, {"bce": 1.0})
