"""`trainer=ddp` on two CPU processes (gloo): disjoint shards, identical weights, one writer, resume in place."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import REPO, TINY, run_cli

DDP = [arg for arg in TINY if not arg.startswith(("trainer.devices", "trainer.accelerator"))]
DDP += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "test=false", "hydra.run.dir=outputs/ddp"]


@pytest.mark.slow
def test_two_cpu_ranks_train_disjoint_shards_to_identical_weights_and_resume(tmp_path, cache_dir):
    env = {
        "GLINT_CACHE_DIR": str(cache_dir),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    report = [
        "trusted_targets=[tests.]",
        "+callbacks.report._target_=tests.helpers.RankReport",
        f"+callbacks.report.out={tmp_path}/first",
    ]
    res = run_cli("glint_lightning.train", *DDP, "trainer.max_epochs=1", *report, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"first/rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    shard0, shard1 = (set(r["tiles"]["0"]) for r in ranks)
    assert len(shard0) == len(shard1) == 24 and not shard0 & shard1, "each rank its own half of the 48 tiles"
    assert shard0 | shard1 == set(range(48))
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP keeps the ranks' weights identical"

    run = tmp_path / "outputs/ddp"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert [p.name for p in tmp_path.glob("outputs/*")] == ["ddp"], "rank 1 writes no run dir of its own"
    assert not list(run.glob(".pl_hydra*")) and (run / ".hydra/config.yaml").is_file()

    report = [
        "trusted_targets=[tests.]",
        "+callbacks.report._target_=tests.helpers.RankReport",
        f"+callbacks.report.out={tmp_path}/second",
    ]
    tested = ["test=true", "calibrate_postprocess=true"]  # the end-of-run calibration and test
    res = run_cli(
        "glint_lightning.train", *DDP, "trainer.max_epochs=2", "ckpt_path=last", *report, *tested, cwd=tmp_path, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert (summary["epochs"], summary["global_step"]) == (2, 2 * 3), "one more epoch of 24 tiles / 8 per step"
    ranks = [json.loads((tmp_path / f"second/rank{r}.json").read_text()) for r in (0, 1)]
    assert list(ranks[0]["tiles"]) == ["1"] and ranks[0]["weights"] == ranks[1]["weights"]

    # both ranks test with the threshold and post-processing rank 0 calibrated: glint-eval's figures in one process
    out = tmp_path / "eval"
    args = [f"ckpt_path={summary['best_checkpoint']}", f"out={out}", "trusted_targets=[tests.]"]
    res = run_cli("glint_lightning.eval", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["threshold"] == summary["threshold"]["value"] != 0.5, "a calibrated threshold, not the default"
    for key in ("test/iou", "test/f1", "test/precision", "test/recall", "test/object_f1"):
        assert summary["test"][key] == pytest.approx(scored[key], abs=1e-6), key
