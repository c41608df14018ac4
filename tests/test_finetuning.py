"""Freezing, unfreezing, per-part learning rates, auxiliary loss and feature maps, through train()."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glint_lightning.module import GlintModule
from glint_lightning.train import build_module, main, train
from glint_lightning.utils.errors import GlintError

SHORT = "+trainer.limit_train_batches=2"  # two steps an epoch: enough for every behaviour here
DEEPLAB = ["model=deeplabv3plus", "test=false", SHORT]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _last(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_frozen_backbone_is_unchanged_and_its_batchnorm_stays_in_eval(make_cfg, tmp_path):
    cfg = make_cfg(*DEEPLAB, "callbacks.freeze.parts=[backbone]", "trainer.max_epochs=1")
    torch.manual_seed(0)
    before = _state(build_module(cfg).model)  # train() seeds the same way, so it starts from these weights
    train(cfg)
    after = {k.removeprefix("model."): v for k, v in _last(tmp_path / "run")["state_dict"].items()}
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    for k in backbone:  # weights and BatchNorm running statistics alike
        torch.testing.assert_close(after[k], before[k], msg=k)
    heads = [k for k in before if k.startswith(("aspp.", "decoder.", "head.")) and k.endswith("weight")]
    assert sum(not torch.equal(after[k], before[k]) for k in heads) > len(heads) // 2


def test_unfreezing_at_an_epoch_adds_the_part_with_its_lr_multiplier(make_cfg, tmp_path):
    train(
        make_cfg(
            *DEEPLAB,
            "callbacks.freeze.parts=[backbone]",
            "callbacks.freeze.unfreeze_at_epoch=1",
            "trainer.max_epochs=3",
            "optimizer.lr=0.002",
            "optimizer.lr_mult={backbone: 0.1}",
            "scheduler=none",
        )
    )
    groups = _last(tmp_path / "run")["optimizer_states"][0]["param_groups"]
    assert [(g.get("name"), g["lr"]) for g in groups] == [("rest", 0.002), ("backbone", pytest.approx(0.0002))]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"lr-Adam/rest", "lr-Adam/backbone"} <= set(events.Tags()["scalars"])


def test_lr_multipliers_make_named_param_groups(make_cfg):
    module = build_module(
        make_cfg(
            *DEEPLAB,
            "optimizer=sgd",
            "optimizer.lr=0.01",
            "scheduler=none",
            "optimizer.lr_mult={backbone: 0.1, aspp: 0.5}",
        )
    )
    optimizer = module.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"rest": 0.01, "backbone": pytest.approx(0.001), "aspp": pytest.approx(0.005)}
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len(list(module.parameters())), "every parameter in exactly one group"
    with pytest.raises(
        GlintError, match="optimizer.lr_mult: DeepLabV3Plus has no part 'encoder'; its parts are backbone"
    ):
        build_module(make_cfg(*DEEPLAB, "optimizer.lr_mult={encoder: 0.1}")).configure_optimizers()


def test_unknown_freeze_part_fails_at_start_up(make_cfg):
    with pytest.raises(GlintError, match="callbacks.freeze.parts: UNet has no part 'backbone'"):
        train(make_cfg("callbacks.freeze.parts=[backbone]"))


def test_aux_head_adds_its_weighted_loss(make_cfg, tmp_path):
    train(make_cfg(*DEEPLAB, "model.aux=true", "aux_weight=0.4", "trainer.max_epochs=1"))
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    expected = final["train/loss_focal"] + final["train/loss_dice"] + 0.4 * final["train/loss_aux"]
    assert final["train/loss_epoch"] == pytest.approx(expected, rel=1e-4)


def test_feature_maps_are_logged(make_cfg, tmp_path):
    train(
        make_cfg(
            *DEEPLAB,
            "trainer.max_epochs=1",
            "callbacks=[default,feature_maps]",
            "callbacks.feature_maps.layers=[backbone,aspp]",
            "callbacks.feature_maps.every_n_epochs=1",
        )
    )
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"features/backbone", "features/aspp"} <= set(events.Tags()["images"])


def test_checkpoint_reloads_without_fetching_pretrained_weights(make_cfg, tmp_path):
    weights = tmp_path / "init.pth"
    torch.save(build_module(make_cfg(*DEEPLAB)).model.state_dict(), weights)
    train(make_cfg(*DEEPLAB, f"model.pretrained={weights}", "trainer.max_epochs=1"))
    weights.unlink()  # gone: a colleague's machine
    module = GlintModule.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert module.hparams.model["pretrained"] is None
    torch.testing.assert_close(
        module.state_dict()["model.head.weight"], _last(tmp_path / "run")["state_dict"]["model.head.weight"]
    )


@pytest.mark.parametrize("model", ["fcn", "smp"])
def test_other_models_train(make_cfg, tmp_path, model):
    if model == "smp":
        pytest.importorskip("segmentation_models_pytorch")
    extra = ["model.arch=UnetPlusPlus"] if model == "smp" else ["model.variant=16s", "model.aux=true"]
    assert train(make_cfg(f"model={model}", "trainer.max_epochs=1", SHORT, *extra)) is not None
    assert _last(tmp_path / "run")["hyper_parameters"]["model"]["_target_"].endswith(("FCN", "SMPModel"))


@pytest.mark.slow
def test_multirun_over_the_three_models(tmp_path, cache_dir, run_main):
    """In this process (test_cli sweeps in a subprocess): the three models build and train under one sweep."""
    args = [
        "-m",
        "model=unet,deeplabv3plus,fcn",
        "data.batch_size=8",
        "data.demo.n_train=32",
        "data.demo.n_val=16",
        "data.demo.n_test=16",
        "data.demo.tile=32",
        "trainer.max_epochs=1",
        SHORT,
        "trainer.accelerator=cpu",
        "trainer.num_sanity_val_steps=0",
        "callbacks.progress.refresh_rate=0",
        "test=false",
    ]
    code, _, stderr = run_main(main, *args, cwd=tmp_path, env={"GLINT_CACHE_DIR": str(cache_dir)})
    assert code == 0, stderr[-3000:]
    targets = []
    for job in sorted(p for p in (tmp_path / "outputs" / "multirun").glob("*/*/*") if p.is_dir()):
        targets.append(_last(job)["hyper_parameters"]["model"]["_target_"].rsplit(".", 1)[1])
    assert targets == ["UNet", "DeepLabV3Plus", "FCN"]


def test_resuming_after_the_unfreeze_epoch_keeps_training_the_part(make_cfg, tmp_path):
    common = [*DEEPLAB, "callbacks.freeze.parts=[backbone]", "callbacks.freeze.unfreeze_at_epoch=1", "scheduler=none"]
    train(make_cfg(*common, "trainer.max_epochs=2"))
    before = _last(tmp_path / "run")["state_dict"]
    train(make_cfg(*common, "trainer.max_epochs=3", "ckpt_path=last"))
    after = _last(tmp_path / "run")
    assert after["epoch"] == 2 and [g.get("name") for g in after["optimizer_states"][0]["param_groups"]] == [
        None,
        "backbone",
    ]
    key = "model.backbone.body.layer4.1.conv2.weight"
    assert not torch.equal(after["state_dict"][key], before[key]), "the unfrozen backbone trains after the resume"
