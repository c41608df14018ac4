"""One writer per run dir: a second train on a live run's dir is refused; a killed run's lock is free at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from glint_lightning.runs.run_lock import LOCK_NAME, RunDirLocked, RunLock, try_lock
from glint_lightning.train import main as train_main
from glint_lightning.train import train
from glint_lightning.utils.errors import GlintError
from tests.helpers import REPO, TINY


def _hold(run_dir, record="", **owner):
    """Lock run_dir's train.lock as another train would (an open file of its own), naming `owner` in it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = try_lock(run_dir / LOCK_NAME)
    f.truncate(0)
    f.write((record or json.dumps({"host": socket.gethostname(), "started": "then", **owner})).encode())
    f.flush()
    return f


def test_the_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunDirLocked, match=rf"{tmp_path}: another glint train is writing to this run dir \(pid "):
            RunLock(tmp_path).acquire()  # the same process, another open file: refused too
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # released: free again, with no note
        pass
    with _hold(tmp_path, pid=os.getppid()):
        RunLock(tmp_path).release()  # never held: leaves others' locks alone
        assert (tmp_path / LOCK_NAME).exists()


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path):
    who = rf"\(pid {os.getppid()} on {socket.gethostname()}, started then\); wait"
    with _hold(tmp_path, pid=os.getppid()), pytest.raises(GlintError, match=who):
        RunLock(tmp_path).acquire()
    unnamed = rf"run dir \({LOCK_NAME} names no process\); wait for it .*dir$"
    with _hold(tmp_path, record=" "), pytest.raises(GlintError, match=unnamed):
        RunLock(tmp_path, patience_s=0.1).acquire()  # locked, never named (hung between its lock and its write)


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
    tail = rf"if it is no longer running, delete {tmp_path / LOCK_NAME}$"
    with _hold(tmp_path, pid=1, host="elsewhere.example"), pytest.raises(GlintError, match=tail):
        RunLock(tmp_path).acquire()


HOLDER = """
import os, sys, time
from glint_lightning.runs.run_lock import RunLock
held = RunLock(sys.argv[1])
held.acquire()
worker = os.fork()  # as a DataLoader worker: it outlives a killed train for a few seconds
if worker == 0:
    time.sleep(120)
    os._exit(0)
open(sys.argv[2], "w").write(str(worker))
input()
"""


def test_a_killed_trains_lock_is_free_at_once_also_while_its_worker_lives(tmp_path, glint_log):
    run_dir, worker_pid = tmp_path / "run", tmp_path / "worker.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), str(worker_pid)], stdin=subprocess.PIPE, cwd=REPO
    )
    try:
        end = time.monotonic() + 60
        while not worker_pid.is_file() or not worker_pid.read_text():
            assert holder.poll() is None and time.monotonic() < end
            time.sleep(0.05)
        with pytest.raises(RunDirLocked, match=rf"\(pid {holder.pid} on "):
            RunLock(run_dir).acquire()
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait()
        with RunLock(run_dir) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        if worker_pid.is_file() and worker_pid.read_text():
            os.kill(int(worker_pid.read_text()), signal.SIGKILL)
    assert f"note: {run_dir / LOCK_NAME}: took over the lock (pid {holder.pid} is no longer running)" in glint_log()
    assert not list(run_dir.iterdir())


@pytest.mark.parametrize("left", ["record of a live pid", "torn"])
def test_a_lock_file_nobody_holds_is_taken_over_with_a_note(tmp_path, left, glint_log):
    if left == "torn":  # killed between creating the file and writing it
        tmp_path.joinpath(LOCK_NAME).write_text("")
    else:  # a live pid that holds no lock is not that run (its pid was reused)
        tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with RunLock(tmp_path, patience_s=0.1) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    why = "an unreadable lock file" if left == "torn" else f"pid {os.getppid()} is no longer running"
    assert f"note: {tmp_path / LOCK_NAME}: took over the lock ({why})" in glint_log()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refused_resume_prints_only_its_refusal(make_cfg, tmp_path, glint_log):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"the other train's checkpoint")
    with _hold(run_dir, pid=os.getppid()), pytest.raises(RunDirLocked, match="another glint train is writing"):
        train(make_cfg("ckpt_path=last"))
    assert "resuming" not in glint_log(), "no announcement of a resume that never happens"


@pytest.mark.slow
def test_a_second_train_on_a_live_runs_dir_is_refused_and_the_first_goes_on(tmp_path, cache_dir, run_main):
    """The first train is another process; the second is the console script's main() in this one."""
    run_dir, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    args = [*TINY, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run_dir}"]
    gate = [
        "+callbacks.gate._target_=tests.gate.WaitForFile",
        f"+callbacks.gate.ready={ready}",
        f"+callbacks.gate.go={go}",
    ]
    env = {
        "GLINT_TRUSTED_TARGETS": "tests.",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    (run_dir / "checkpoints").mkdir(parents=True)  # an earlier run's, which a second train may want to resume
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"overwritten by the first train")
    first = subprocess.Popen(
        [sys.executable, "-m", "glint_lightning.train", *args, *gate],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + 240
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < end, first.communicate()[1][-3000:]
            time.sleep(0.1)
        code, _, second_err = run_main(train_main, *args, "ckpt_path=last", cwd=tmp_path, env=env)
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert code == 2 and "Traceback" not in second_err, second_err[-3000:]
    (refusal,) = second_err.strip().splitlines()  # only the refusal: no "resuming this run in place from ..."
    assert refusal.startswith(
        f"error: {run_dir}: another glint train is writing to this run dir (pid {first.pid} on "
        f"{socket.gethostname()}, started "
    ) and refusal.endswith("); wait for it to end or pass another hydra.run.dir"), refusal
    assert first.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1, "the first run finished unharmed"
    assert not (run_dir / LOCK_NAME).exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_any_node(tmp_path, monkeypatch, glint_log):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    # held on a shared file system by a node that died: the file server drops the lock only later
    stale = _hold(tmp_path, pid=os.getppid(), host="node7.example", slurm_job="12", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    with pytest.raises(GlintError, match="delete"):  # not requeued: that run may still be alive on node7
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM ended it before starting the job again
    with stale, RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["slurm_restart"] == 1
    assert f"took over the lock (SLURM ended pid {os.getppid()} of this job)" in glint_log()
