"""MLflow logging, and what every run dir records about where its result came from."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from glint_lightning.data.sources import file_fingerprint
from glint_lightning.train import train
from tests.helpers import REPO


@pytest.mark.slow
def test_mlflow_logger_records_params_and_metrics_locally(make_cfg, tmp_path):
    import mlflow

    short = ["++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1", "calibrate_threshold=false"]
    train(make_cfg("trainer.max_epochs=1", "test=false", *short, "logger=[csv,mlflow]"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("glint").experiment_id])
    assert 0 <= run.data.metrics["val/iou"] <= 1
    assert run.data.params["loss/_target_"] == "glint_lightning.losses.HybridLoss"
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file(), "loggers combine"


def test_run_dir_records_code_version_and_data_fingerprints(trained_run):
    prov = json.loads((trained_run / "provenance.json").read_text())
    commit = prov["git"]["commit"]
    # the session's shared run may predate a commit made since: the recorded one is HEAD or one of its ancestors
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO, capture_output=True)
    assert len(commit) == 40 and ancestor.returncode == 0, commit
    assert isinstance(prov["git"]["dirty"], bool)
    assert prov["glint_lightning"] and prov["versions"]["torch"]
    assert set(prov["data"]) == {"train", "val", "test"}
    for entry in prov["data"].values():
        assert entry["fingerprint"] == file_fingerprint(entry["path"]) and entry["bytes"] > 0


def test_fingerprint_sees_a_changed_block_of_a_large_file(tmp_path):
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(64 * 1024)
    path.write_bytes(data)
    small_blocks = {"blocks": 4, "block_size": 1024}  # sampled, not read whole
    before = file_fingerprint(path, **small_blocks)
    assert before == file_fingerprint(path, **small_blocks)
    changed = bytearray(data)
    changed[-1] ^= 1  # the last block is always sampled
    path.write_bytes(bytes(changed))
    assert file_fingerprint(path, **small_blocks) != before
