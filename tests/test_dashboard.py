"""optuna-dashboard (the `sweep` extra) opens a sweep's study file as it is: every trial with its parameters, value
and state, read through the dashboard's own HTTP API on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.optuna_task import TaskSweep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, server: subprocess.Popen, tries: int = 300) -> dict:
    """GET a JSON answer, waiting (bounded) for the server to start."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.loads(answer.read())
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None:
                pytest.fail(f"optuna-dashboard exited: {server.communicate()[0][-3000:]}")
            time.sleep(0.1)
    pytest.fail(f"optuna-dashboard did not answer {url}")


def test_optuna_dashboard_shows_every_trial_of_a_sweep(tmp_path):
    sweep = TaskSweep(tmp_path, n_trials=3, fail_above=0.6)
    sweep.run()
    trials = sweep.trials()
    port = _free_port()
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen(
        [str(dashboard), f"sqlite:///{sweep.db}", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        studies = _get(f"http://127.0.0.1:{port}/api/studies", server)["study_summaries"]
        assert [(s["study_name"], s["directions"]) for s in studies] == [("glint", ["maximize"])]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", server)
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.communicate(timeout=30)
    shown = {
        t["number"]: (t["state"], {p["name"]: float(p["param_external_value"]) for p in t["params"]}, t.get("values"))
        for t in detail["trials"]
    }
    assert shown == {
        t.number: (t.state.name.capitalize(), t.params, [t.value] if t.value is not None else None) for t in trials
    }
    assert {state for state, _, _ in shown.values()} == {"Complete", "Fail"}
