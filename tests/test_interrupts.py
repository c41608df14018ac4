"""SIGTERM and Ctrl-C stop a run with a resumable checkpoint; a mid-epoch checkpoint resumes exactly."""

from __future__ import annotations

import signal

import pytest
import torch

from glint_lightning.train import train
from glint_lightning.utils.errors import Interrupted
from tests.helpers import EXACT, Crash

# 48 training tiles in batches of 8: 6 steps an epoch. Each interrupted and resumed run must end with the weights of
# the same settings (EXACT) trained straight through: the session's `exact_straight`.

pytestmark = pytest.mark.slow  # each test trains and resumes (seconds each)


@pytest.fixture(autouse=True)
def trust_test_callbacks(monkeypatch):
    """The signal and crash callbacks below live in tests.helpers: the user's own code, trusted as a user would."""
    monkeypatch.setenv("GLINT_TRUSTED_TARGETS", "tests.")


@pytest.fixture
def terminal_sigint():
    """Ctrl-C handling as in a terminal (a CI job or a background shell may start with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _stop_at(step: int, signum: int) -> list[str]:
    return [
        "+callbacks.stop._target_=tests.helpers.SignalAtStep",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.signum={int(signum)}",
    ]


def _ckpt(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("signum, name, code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_a_signal_mid_epoch_saves_a_checkpoint_that_resumes_exactly(
    make_cfg, tmp_path, terminal_sigint, exact_straight, signum, name, code
):
    with pytest.raises(
        Interrupted,
        match=rf"{name} at epoch 1, step 8; saved .*last\.ckpt\. Resume with .*"
        r"ckpt_path=last",
    ) as info:
        train(make_cfg(*EXACT, *_stop_at(8, signum), run="split"))
    assert info.value.exit_code == code
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C handling is restored"
    saved = _ckpt(tmp_path / "split/checkpoints/last.ckpt")
    assert (saved["epoch"], saved["global_step"]) == (1, 8)
    train(make_cfg(*EXACT, "ckpt_path=last", run="split"))
    resumed = _ckpt(tmp_path / "split/checkpoints/last.ckpt")
    assert resumed["global_step"] == 12, "the resumed epoch runs only its 4 remaining steps"
    for key in exact_straight:
        torch.testing.assert_close(resumed["state_dict"][key], exact_straight[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("hook, step, saved", [("train_batch_start", 8, 8), ("validation_start", 6, 5)])
def test_a_crash_after_a_step_checkpoint_resumes_exactly(make_cfg, tmp_path, exact_straight, hook, step, saved):
    """Mid-epoch (step checkpoints keep last.ckpt within a step of the crash), and after an epoch's last step (no
    step checkpoint there; the epoch-end one follows): the resumed run replays exactly the lost steps."""
    every_step = [*EXACT, "callbacks.step_checkpoint.every_n_train_steps=1"]
    crash = [
        "+callbacks.crash._target_=tests.helpers.CrashAt",
        f"+callbacks.crash.step={step}",
        f"+callbacks.crash.hook={hook}",
    ]
    with pytest.raises(Crash):
        train(make_cfg(*every_step, *crash, run="split"))
    assert _ckpt(tmp_path / "split/checkpoints/last.ckpt")["global_step"] == saved
    train(make_cfg(*every_step, "ckpt_path=last", run="split"))
    resumed = _ckpt(tmp_path / "split/checkpoints/last.ckpt")
    assert resumed["global_step"] == 12
    for key in exact_straight:
        torch.testing.assert_close(resumed["state_dict"][key], exact_straight[key], atol=1e-6, rtol=0, msg=key)
