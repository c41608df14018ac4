"""Fine-tuning and visualisation callbacks that do what they say, through real tiny trainings: unfrozen BatchNorm
learns again, the unfreeze epoch's learning rates are logged from its first step, every requested feature-map layer
gives an image (containers through their children) or a start-up error, and a short run still logs its grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glint_lightning.callbacks import FeatureMaps
from glint_lightning.callbacks.feature_maps import check_layers, hook_targets
from glint_lightning.callbacks.finetuning import BATCH_NORMS
from glint_lightning.train import build_module, train
from glint_lightning.utils.errors import GlintError

STEPS_PER_EPOCH = 6  # 48 training tiles in batches of 8 (tests/helpers.py TINY)


class NormModes(L.Callback):
    """Writes, per epoch, the training flags of the BatchNorm layers under `parts` seen after each training batch."""

    def __init__(self, out: str, parts: list[str]) -> None:
        self.out, self.parts, self.modes = Path(out), parts, {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        parts = [pl_module.model.get_submodule(p) for p in self.parts]
        norms = [m for part in parts for m in part.modules() if isinstance(m, BATCH_NORMS)]
        self.modes.setdefault(trainer.current_epoch, set()).update(bn.training for bn in norms)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.write_text(json.dumps({e: sorted(m) for e, m in self.modes.items()}))


def _events(run_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()


def test_unfrozen_batchnorm_learns_again_and_the_new_groups_lrs_are_logged_from_the_first_step(
    make_cfg, tmp_path, monkeypatch
):
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "tests.")  # the probe below is the user's own code
    modes = tmp_path / "modes.json"
    cfg = make_cfg(
        "callbacks.freeze.parts=[inc,downs]",
        "callbacks.freeze.unfreeze_at_epoch=1",
        "optimizer.lr_mult={downs: 0.5}",
        "scheduler=none",
        "test=false",
        "callbacks.checkpoint.every_n_epochs=1",
        "+callbacks.probe._target_=tests.test_finetuning_behaviour.NormModes",
        f"+callbacks.probe.out={modes}",
        "+callbacks.probe.parts=[inc,downs]",
    )
    train(cfg)
    assert json.loads(modes.read_text()) == {"0": [False], "1": [True]}, "eval while frozen, train once unfrozen"
    ckpts = tmp_path / "run" / "checkpoints"
    frozen, unfrozen = (
        torch.load(ckpts / name, weights_only=True)["state_dict"] for name in ("epoch000.ckpt", "last.ckpt")
    )
    norms = [k for k in unfrozen if k.startswith(("model.inc.", "model.downs.")) and k.endswith("num_batches_tracked")]
    assert norms and {int(unfrozen[k]) for k in norms} == {STEPS_PER_EPOCH}, "statistics move in the unfrozen epoch"
    assert {int(frozen[k]) for k in norms} == {0}, "and not while frozen"
    for key in (k.replace("num_batches_tracked", stat) for k in norms for stat in ("running_mean", "running_var")):
        assert not torch.equal(unfrozen[key], frozen[key]), key
    scalars = _events(tmp_path / "run")
    lrs = {tag: [(e.step, e.value) for e in scalars.Scalars(tag)] for tag in ("lr-Adam/inc", "lr-Adam/downs")}
    assert lrs == {
        "lr-Adam/inc": [(STEPS_PER_EPOCH, pytest.approx(1e-3))],
        "lr-Adam/downs": [(STEPS_PER_EPOCH, pytest.approx(5e-4))],
    }, "logged at the unfreeze epoch's first step"
    assert [e.step for e in scalars.Scalars("lr-Adam/rest")] == [0, STEPS_PER_EPOCH]


def test_feature_maps_of_containers_come_from_their_children(make_cfg, tmp_path):
    train(
        make_cfg(
            "trainer.max_epochs=1",
            "test=false",
            "callbacks=[default,feature_maps]",
            "callbacks.feature_maps.layers=[inc,downs,ups.1,head]",
            "callbacks.feature_maps.every_n_epochs=1",
        )
    )
    images = set(_events(tmp_path / "run").Tags()["images"])
    features = {"inc", "downs.0", "downs.1", "ups.1", "head"}
    assert {t for t in images if t.startswith("features/")} == {f"features/{n}" for n in features}


def test_a_feature_map_layer_that_never_runs_is_refused_at_start(make_cfg):
    cfg = make_cfg(
        "model=deeplabv3plus",
        "model.aux=true",
        "callbacks=[default,feature_maps]",
        "callbacks.feature_maps.layers=[aspp,aux_head]",
    )
    with pytest.raises(GlintError, match=r"callbacks.feature_maps.layers: 'aux_head' .*; layers that run: backbone"):
        train(cfg)


def test_a_run_shorter_than_the_image_interval_logs_the_grid_once_at_the_end(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1", "test=false", "callbacks.prediction_images.every_n_epochs=5"))
    events = _events(tmp_path / "run")
    assert [e.step for e in events.Images("val/predictions")] == [STEPS_PER_EPOCH]


def test_a_layer_that_does_not_run_in_a_logged_validation_is_named_in_a_warning(make_cfg, tmp_path):
    """The start-up probe runs for fit only; a layer that then produces nothing is still named, never skipped."""
    cfg = make_cfg("model=deeplabv3plus", "model.aux=true")
    datamodule = instantiate(cfg.data, _convert_="all")
    callback = FeatureMaps(["aspp", "aux_head"], every_n_epochs=1)
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path, name="tb"),
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match=r"layers: 'aux_head' did not run in this validation batch; no features/aux"):
        trainer.validate(build_module(cfg), datamodule=datamodule, verbose=False)
    assert set(EventAccumulator(trainer.logger.log_dir).Reload().Tags()["images"]) == {"features/aspp"}


def test_the_layer_probe_runs_a_compiled_model_eagerly(make_cfg):
    """compile=true compiles the network in place; the start-up probe checks its layers without compiling it."""
    compiled = []
    model = build_module(make_cfg()).model
    model.compile(backend=lambda graph, inputs: compiled.append(graph) or graph.forward)
    check_layers(model, hook_targets(model, ["downs"]))
    runs = r"'stray' of UNet does not run in the validation .*; layers that run: inc, downs.0"
    with pytest.raises(GlintError, match=runs):
        check_layers(model, {"stray": torch.nn.Conv2d(1, 1, 1)})
    assert not compiled, "the probe went through torch.compile"
