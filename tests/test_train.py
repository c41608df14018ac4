"""Training through the real entry point: Hydra compose + train(), checkpoints, resume, config checks."""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import glint_lightning.train as train_module
from glint_lightning.ckpt_info import describe, format_info
from glint_lightning.eval import evaluate
from glint_lightning.inference.loading import stored_postprocess
from glint_lightning.inference.postprocess import PostProcess
from glint_lightning.module import GlintModule
from glint_lightning.train import build_module, train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import EXACT

SHORT = [  # 2 steps an epoch and one validation batch: enough to follow a schedule across a resume
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "test=false",
    "calibrate_threshold=false",
    "callbacks.prediction_images.every_n_epochs=0",
]


def _ckpts(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


def test_train_writes_checkpoints_metrics_and_returns_the_optimized_metric(make_cfg, tmp_path, capsys):
    cfg = make_cfg("callbacks.checkpoint.every_n_epochs=1", "callbacks.prediction_images.every_n_epochs=2")
    score = train(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "metrics.json").read_text())
    out = capsys.readouterr().out
    assert re.search(r"^best checkpoint: \S+best-epoch00[01]\.ckpt \(val/iou=\d\.\d{4}\)$", out, re.M), out
    scores = [ln for ln in out.splitlines() if ln.startswith(("best checkpoint:", "final val:", "test (best):"))]
    assert len(scores) == 3 and not any(re.search(r"\d\.\d{5}", ln) for ln in scores), scores
    assert not (run / "train.lock").exists(), "the run dir's lock is released at the end"
    assert isinstance(score, float) and score == pytest.approx(summary["best_score"])
    assert {"best-epoch000.ckpt", "best-epoch001.ckpt"} & set(_ckpts(run))
    assert {"last.ckpt", "epoch000.ckpt", "epoch001.ckpt"} <= set(_ckpts(run))
    for name in ("val/iou", "val/f1", "val/precision", "val/recall", "val/ap", "val/loss"):
        assert name in summary["final"]
    assert {"test/iou", "test/ap"} <= set(summary["test"])
    assert json.loads((run / "data.json").read_text())["splits"]["train"]["tiles"] == 48
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("val/predictions")] == [summary["global_step"]], "a grid at epoch 2 only"
    assert {"train/loss_epoch", "val/iou", "lr-Adam"} <= set(events.Tags()["scalars"])

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["_target_"] == "glint_lightning.models.UNet" and hp["config"]["loss"] == hp["loss"]
    assert hp["config"]["trainer"]["max_epochs"] == 2 and ckpt["has_optimizer_state"] is True
    assert "postprocess" not in ckpt["threshold_calibration"], "calibrate_postprocess is off by default"
    assert "selection" not in summary["threshold"] and re.search(r"^threshold: +\d\.\d\d \(maximises val F1", out, re.M)
    module = GlintModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert float(module.depth_std) > 1.0, "normalisation statistics travel with the weights"


@pytest.mark.parametrize(
    "opt, cls",
    [
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_optimizers_from_config(make_cfg, opt, cls):
    module = build_module(make_cfg(f"optimizer={opt}", "optimizer.lr=0.004", "scheduler=none"))
    optimizer = module.configure_optimizers()
    assert type(optimizer) is cls and optimizer.param_groups[0]["lr"] == pytest.approx(0.004)


@pytest.mark.parametrize(
    "sched, cls", [("cosine", "CosineAnnealingLR"), ("exponential", "ExponentialLR"), ("linear", "LinearLR")]
)
def test_schedulers_from_config_with_optional_warmup(make_cfg, sched, cls):
    conf = module_conf = build_module(make_cfg(f"scheduler={sched}")).configure_optimizers()
    assert type(conf["lr_scheduler"]["scheduler"]).__name__ == cls and conf["lr_scheduler"]["interval"] == "epoch"
    module_conf = build_module(
        make_cfg(f"scheduler={sched}", "scheduler.warmup_epochs=3", "scheduler.warmup_start_factor=0.2")
    ).configure_optimizers()
    optimizer, scheduler = module_conf["optimizer"], module_conf["lr_scheduler"]["scheduler"]
    assert type(scheduler).__name__ == "SequentialLR"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2e-3)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3, rel=0.05)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optimized_metric=val/iuo", "optimized_metric=val/iuo is not a logged metric"),
        (
            "callbacks.best_checkpoint.mode=min",
            "callbacks.best_checkpoint.monitor: val/iou improves towards 'max'",
        ),
        ("optimizer.lr=0", "optimizer.lr=0"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt: no such file"),
        ("ckpt_path=last", "ckpt_path=last: no last.ckpt in"),
        ("model.depth=6", r"tiles are 32x32 px, smaller than the model.s total stride of 64 px.*model.depth=2"),
    ],
)
def test_bad_options_fail_before_training(make_cfg, tmp_path, override, match):
    with pytest.raises(GlintError, match=match):
        train(make_cfg(override))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resume_is_exact(make_cfg, tmp_path, capsys, glint_log, exact_straight):
    """One epoch, then a second in a resumed run, ends with the weights of the two epochs trained straight."""
    train(make_cfg(*EXACT, "trainer.max_epochs=1", run="split"))
    capsys.readouterr()
    train(make_cfg(*EXACT, "trainer.max_epochs=2", "ckpt_path=last", run="split"))
    err = capsys.readouterr().err
    assert "schedule:" not in glint_log() and "warning:" not in err, "the same settings resume as stored"
    resumed = _weights(tmp_path / "split/checkpoints/last.ckpt")
    assert torch.load(tmp_path / "split/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2 * 6
    for key in exact_straight:
        torch.testing.assert_close(resumed[key], exact_straight[key], atol=1e-6, rtol=0, msg=key)
    assert not (tmp_path / "split/checkpoints/last-v1.ckpt").exists(), "in-place resume rewrites last.ckpt"
    assert sorted(p.name for p in (tmp_path / "split").iterdir() if p.name.startswith("tensorboard")) == ["tensorboard"]
    assert len(list((tmp_path / "split/tensorboard").glob("events.*"))) == 2, "resumed logs append to the same dir"


def _copy_of(ckpt, run_dir):
    """`ckpt` as the last.ckpt of a run dir of its own (a finished earlier run, without training one)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    return Path(shutil.copy(ckpt, run_dir / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_last_resolves_to_newest_run_under_outputs_when_run_dir_is_new(make_cfg, tmp_path, trained_ckpt, glint_log):
    first_last = _copy_of(trained_ckpt, tmp_path / "first")
    before = first_last.read_bytes()
    train(make_cfg(*SHORT, "trainer.max_epochs=2", "ckpt_path=last", run="second"))
    assert f"resuming from the newest last.ckpt under {tmp_path}/: {first_last}" in glint_log()
    assert torch.load(tmp_path / "second/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1
    assert first_last.read_bytes() == before, "the earlier run's checkpoint is left alone"


@pytest.mark.slow
def test_resume_refuses_a_different_model_config(make_cfg, tmp_path, trained_ckpt):
    _copy_of(trained_ckpt, tmp_path / "run")
    with pytest.raises(GlintError, match=r"model\.base_channels: 4 -> 8"):
        train(make_cfg("trainer.max_epochs=2", "model.base_channels=8", "ckpt_path=last"))
    # where the initial weights came from may differ (the checkpoint's weights win); what the network is may not
    weights = tmp_path / "init.pth"
    torch.save(torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"], weights)
    train(make_cfg(*SHORT, "trainer.max_epochs=2", f"model.pretrained={weights}", "ckpt_path=last"))
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1


def _best_state(ckpt):
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and "'val/iou'" in k)


@pytest.mark.slow
def test_optimizer_state_off_shrinks_checkpoints_and_resumes_partially(make_cfg, tmp_path, recwarn):
    common = [*SHORT, "trainer.max_epochs=1", "model.base_channels=8"]
    train(make_cfg(*common, run="full"))
    train(make_cfg(*common, "callbacks.optimizer_state.save=false", run="slim"))
    full, slim = tmp_path / "full/checkpoints/last.ckpt", tmp_path / "slim/checkpoints/last.ckpt"
    assert slim.stat().st_size <= 0.6 * full.stat().st_size
    slim_ckpt = torch.load(slim, weights_only=True)
    assert "optimizer_states" not in slim_ckpt and "lr_schedulers" not in slim_ckpt
    assert slim_ckpt["has_optimizer_state"] is False
    best_before = _best_state(slim_ckpt)

    warnings.simplefilter("always")
    train(
        make_cfg(
            *SHORT,
            "trainer.max_epochs=2",
            "model.base_channels=8",
            "scheduler=none",
            "optimizer.lr=0.0123",
            "ckpt_path=last",
            run="slim",
        )
    )
    msgs = [str(w.message) for w in recwarn if "no optimizer state" in str(w.message)]
    assert len(msgs) == 1, msgs
    resumed = torch.load(slim, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * slim_ckpt["global_step"]
    assert best_before["best_model_score"] is not None
    state = _best_state(resumed)
    assert state["best_model_score"] >= best_before["best_model_score"], "best-score tracking carried over"
    optimizer = resumed["optimizer_states"][0]
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.0123), "fresh optimizer at the configured LR"
    adam_steps = {float(s["step"]) for s in optimizer["state"].values()}
    assert adam_steps == {float(slim_ckpt["global_step"])}, "Adam moments start from zero at the resume"


def _epoch_lrs(run_dir):
    """The learning rate of each epoch, as LearningRateMonitor logged it at the epoch's start."""
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return [e.value for e in sorted(events.Scalars("lr-Adam"), key=lambda e: e.step)]


def _fresh_schedule_lrs(cfg, epochs):
    """What a run configured as `cfg` from scratch uses in each epoch."""
    conf = build_module(cfg).configure_optimizers()
    optimizer, scheduler, lrs = conf["optimizer"], conf["lr_scheduler"]["scheduler"], []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, line",
    [
        ([], "schedule: cosine over 2 -> 4 epochs; continuing at epoch 2 (lr 5.0e-04)"),
        (
            ["scheduler.warmup_epochs=1"],
            "schedule: cosine over 2 -> 4 epochs (after a warm-up of 1 epoch); continuing at epoch 2 (lr 8.5e-04)",
        ),
        (["callbacks.optimizer_state.save=false"], "schedule: cosine over 2 -> 4 epochs; continuing at epoch 2"),
    ],
    ids=["cosine", "warmup", "weights-only"],
)
def test_training_longer_continues_the_schedule_for_the_new_length(
    make_cfg, tmp_path, capsys, variant, line, glint_log
):
    train(make_cfg(*SHORT, *variant, "trainer.max_epochs=2"))
    capsys.readouterr()
    longer = make_cfg(*SHORT, *variant, "trainer.max_epochs=4", "ckpt_path=last")
    train(longer)
    assert line in glint_log()
    expected, final = _fresh_schedule_lrs(longer, 4)
    assert _epoch_lrs(tmp_path / "run")[2:] == pytest.approx(expected[2:], rel=1e-5), "where the 4-epoch curve is"
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    if "optimizer_states" in ckpt:
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(final, rel=1e-5)
        assert ckpt["lr_schedulers"][0]["last_epoch"] == 4
    if not variant:
        assert final == pytest.approx(1e-6), "the cosine ends at eta_min, not back at the full learning rate"


@pytest.mark.slow
def test_resume_names_other_differences_and_applies_them(make_cfg, tmp_path, capsys, glint_log):
    train(make_cfg(*SHORT, "trainer.max_epochs=1"))
    capsys.readouterr()
    train(
        make_cfg(
            *SHORT,
            "trainer.max_epochs=2",
            "optimizer.weight_decay=0.01",
            "loss=bce",
            "data.batch_size=16",
            "ckpt_path=last",
        )
    )
    out, err = capsys.readouterr()
    warning = [ln for ln in err.splitlines() if ln.startswith("warning: resuming")]
    assert warning == [
        "warning: resuming with settings that differ from the checkpoint's; this run's apply from epoch 1: "
        "optimizer.weight_decay: 0.0 -> 0.01; loss: HybridLoss -> BCELoss; data.batch_size: 8 -> 16"
    ]
    assert "schedule: cosine over 1 -> 2 epochs; continuing at epoch 1" in glint_log()
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01, "this run's value applies"
    assert any(float(s["step"]) == 4 for s in ckpt["optimizer_states"][0]["state"].values()), "Adam moments kept"


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "trainer.max_epochs=1",
            r"last\.ckpt: the checkpoint holds 1 finished epoch \(global step 6\), so trainer\.max_epochs=1 leaves "
            r"nothing to train; pass trainer\.max_epochs=2 or more to train longer",
        ),
        ("++trainer.max_steps=6", r"so trainer\.max_steps=6 leaves nothing to train; pass trainer\.max_steps=7"),
    ],
)
def test_resume_refuses_a_length_the_checkpoint_has_reached(make_cfg, trained_ckpt, override, match):
    with pytest.raises(GlintError, match=match):
        train(make_cfg(override, f"ckpt_path={trained_ckpt}"))


def test_summary_without_checkpoints_says_why(make_cfg, tmp_path, capsys):
    train(make_cfg("++trainer.fast_dev_run=true", "test=false"))
    out = capsys.readouterr().out
    assert "best checkpoint: none (fast_dev_run saves no checkpoints)" in out
    assert "last checkpoint: none (fast_dev_run saves no checkpoints)" in out
    assert json.loads((tmp_path / "run/metrics.json").read_text())["best_checkpoint"] is None


def test_a_network_that_breaks_the_contract_is_refused_before_training(make_cfg, tmp_path):
    cfg = make_cfg()
    with open_dict(cfg):
        cfg.model = {"_target_": "torch.nn.Flatten"}  # (B, 1, H, W) -> (B, H * W)
    with pytest.raises(GlintError, match=r"model\._target_=torch\.nn\.Flatten: returned shape \(2, 4\)"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "train.lock").exists(), "the run dir's lock is released on errors"


@pytest.mark.slow
def test_training_longer_after_an_unfreeze_keeps_the_unfrozen_parts_group(make_cfg, tmp_path, capsys, glint_log):
    common = [*SHORT, "callbacks.freeze.parts=[inc]", "callbacks.freeze.unfreeze_at_epoch=1"]
    train(make_cfg(*common, "trainer.max_epochs=2"))
    train(make_cfg(*common, "trainer.max_epochs=3", "ckpt_path=last"))
    assert "schedule: cosine over 2 -> 3 epochs; continuing at epoch 2" in glint_log()
    groups = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]
    assert [g.get("name") for g in groups["param_groups"]] == [None, "inc"]


@pytest.mark.slow
def test_resume_with_another_optimizer_starts_its_state_fresh(make_cfg, tmp_path, capsys, glint_log):
    train(make_cfg(*SHORT, "trainer.max_epochs=1"))
    capsys.readouterr()
    train(make_cfg(*SHORT, "trainer.max_epochs=2", "optimizer=sgd", "ckpt_path=last"))
    out, err = capsys.readouterr()
    assert "this run's apply from epoch 1: optimizer: Adam -> SGD" in err
    assert (
        "schedule: cosine over 1 -> 2 epochs; continuing at epoch 1 (lr 5.0e-03); the optimizer state starts fresh "
        "(Adam -> SGD)" in glint_log()
    )
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]
    assert state["param_groups"][0]["momentum"] == 0.9
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values()), "no Adam moments carried into SGD"


def test_end_of_run_test_scores_with_the_calibrated_post_processing(make_cfg, tmp_path, monkeypatch):
    """The summary's test figures are glint-eval's on the test split with what the calibration stored."""
    real = train_module.calibrate_postprocess

    def remove_everything(*args, **kwargs):  # a kept post-processing that visibly changes the test masks
        cal = real(*args, **kwargs)
        cal.selection.postprocess = PostProcess(min_size=10_000)  # larger than a tile: no glint survives
        return cal

    monkeypatch.setattr(train_module, "calibrate_postprocess", remove_everything)
    train(make_cfg("trainer.max_epochs=1", "calibrate_postprocess=true"))
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["threshold"]["postprocess"]["min_size"] == 10_000

    def scored(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            args = [f"ckpt_path={summary['best_checkpoint']}", "split=test", f"out={tmp_path / 'e'}", *overrides]
            return evaluate(compose("eval", overrides=args))

    stored, without = scored(), scored("postprocess.min_size=0", "postprocess.fill_holes=false")
    assert stored["postprocess"]["source"] == "stored" and without["test/iou"] > 0, "the masks it removes exist"
    for key in ("test/iou", "test/f1", "test/precision", "test/recall", "test/object_f1"):
        assert summary["test"][key] == pytest.approx(stored[key], abs=1e-6), key
    assert summary["test"]["test/iou"] == 0.0 and summary["test"]["test/ap"] == pytest.approx(without["test/ap"])


def test_calibrate_postprocess_stores_what_glint_eval_calibrate_stores(make_cfg, tmp_path, capsys):
    train(make_cfg("trainer.max_epochs=1", "test=false", "calibrate_postprocess=true"))
    out = capsys.readouterr().out
    run = tmp_path / "run"
    chosen = json.loads((run / "metrics.json").read_text())["threshold"]
    assert f"calibrated:      {chosen['selection']} (stored in the checkpoints)" in out
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    shutil.copy(best, tmp_path / "by_eval.ckpt")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [f"ckpt_path={tmp_path / 'by_eval.ckpt'}", "calibrate=true", "split=val", f"out={tmp_path / 'e'}"]
        evaluate(compose("eval", overrides=overrides))
    by_eval = torch.load(tmp_path / "by_eval.ckpt", weights_only=True)["threshold_calibration"]
    for path in (best, run / "checkpoints" / "last.ckpt"):
        ckpt = torch.load(path, weights_only=True)
        stored = ckpt["threshold_calibration"]
        assert stored["postprocess"] == chosen["postprocess"] == by_eval["postprocess"], path.name
        assert ckpt["hyper_parameters"]["threshold"] == stored["threshold"] == chosen["value"] == by_eval["threshold"]
        assert stored["postprocess"]["metric"] == "iou" and stored["postprocess"]["tiles"] == 16
        assert stored_postprocess(path) == PostProcess.from_dict(chosen["postprocess"]), "eval/predict read it back"
        line = next(ln for ln in format_info(describe(path)).splitlines() if ln.startswith("post-processing:"))
        assert "val tiles: iou" in line, line
