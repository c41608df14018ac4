"""MLflow logging, and what every run dir records about where its result came from."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from glint_lightning.runs.provenance import file_fingerprint
from glint_lightning.train import train
from tests.helpers import REPO


def test_mlflow_logger_records_params_and_metrics_locally(make_cfg, tmp_path):
    import mlflow

    train(make_cfg("trainer.max_epochs=1", "test=false", "logger=[csv,mlflow]"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("glint").experiment_id])
    assert 0 <= run.data.metrics["val/iou"] <= 1
    assert run.data.params["loss/_target_"] == "glint_lightning.losses.HybridLoss"
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file(), "loggers combine"


def test_run_dir_records_code_version_and_data_fingerprints(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1", "test=false"))
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
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
