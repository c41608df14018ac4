"""One writer per run dir: a second train on a live run's dir is refused; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from glint_lightning.runs.run_lock import LOCK_NAME, RunDirLocked, RunLock, is_running
from glint_lightning.utils.errors import GlintError
from tests.helpers import REPO, TINY, run_cli


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "then", **owner}))


def test_the_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname()) and is_running(owner)
        with pytest.raises(RunDirLocked, match=rf"{tmp_path}: another glint train is writing to this run dir \(pid "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).release()  # never held: leaves others' locks alone
    _write_lock(tmp_path, pid=os.getppid(), token="theirs")
    RunLock(tmp_path).release()
    assert (tmp_path / LOCK_NAME).exists()


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path):
    _write_lock(tmp_path, pid=os.getppid())
    with pytest.raises(GlintError, match=rf"\(pid {os.getppid()} on {socket.gethostname()}, started then\); wait"):
        RunLock(tmp_path).acquire()


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere.example")
    with pytest.raises(GlintError, match=rf"if it is no longer running, delete {tmp_path / LOCK_NAME}$"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("owner", ["dead", "reused pid", "torn"])
def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path, capsys, owner, glint_log):
    if owner == "dead":
        _write_lock(tmp_path, pid=_dead_pid())
    elif owner == "reused pid":  # a live pid that started after the lock was written belongs to someone else
        _write_lock(tmp_path, pid=os.getppid(), proc_start="1")
    else:
        tmp_path.joinpath(LOCK_NAME).write_text("")  # killed between creating the file and writing it
    with RunLock(tmp_path, patience_s=0.1) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"note: {tmp_path / LOCK_NAME}: took over the lock" in glint_log()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_second_train_on_a_live_runs_dir_is_refused_and_the_first_goes_on(tmp_path, cache_dir):
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
        second = run_cli("glint_lightning.train", *args, cwd=tmp_path, env=env)
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    refusal = second.stderr.strip().splitlines()[-1]
    assert refusal.startswith(
        f"error: {run_dir}: another glint train is writing to this run dir (pid {first.pid} on "
        f"{socket.gethostname()}, started "
    ) and refusal.endswith("); wait for it to end or pass another hydra.run.dir"), refusal
    assert first.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1, "the first run finished unharmed"
    assert not (run_dir / LOCK_NAME).exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_any_node(tmp_path, monkeypatch, capsys, glint_log):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    _write_lock(tmp_path, pid=os.getppid(), host="node7.example", slurm_job="12", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    with pytest.raises(GlintError, match="delete"):  # not requeued: that run may still be alive on node7
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM ended it before starting the job again
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["slurm_restart"] == 1
    assert "took over the lock" in glint_log()
