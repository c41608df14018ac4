"""glint-plan: the fingerprint's values (computed here independently with numpy/scipy), the planning rules, the
written plan composing and training within its budget, bad input (one line, exit 2, nothing written), and the
device timing on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from scipy import ndimage

import glint_lightning.plan as plan_app
from glint_lightning.data import GlintDataModule
from glint_lightning.data.fingerprint import fingerprint
from glint_lightning.runs.planning import (
    TARGET,
    VALIDATION_SHARE,
    Budget,
    choose_batch,
    choose_depth,
    choose_width,
    depth_clip_choice,
    loss_choices,
    postprocess_choice,
    receptive_field,
    solve_budget,
    tiles_wanted,
)
from glint_lightning.runs.step_timing import StepTiming, resolve_device, time_steps
from glint_lightning.train import train
from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import GlintError
from tests.helpers import run_cli, write_tiles

SCALE = 0.25  # mm per stored unit


def glint_tiles(n: int, size: int = 32, seed: int = 0, glints: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """uint16 depth in SCALE mm units with holes (0) and 1-3 px glints raised above a tilted plane."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    depth = np.empty((n, size, size), np.uint16)
    mask = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        plane = 4000 + 20 * yy + rng.uniform(-10, 10) * xx + rng.normal(0, 4, (size, size))
        for _ in range(rng.integers(0, 4) if glints else 0):
            y, x = rng.integers(2, size - 4, 2)
            h, w = rng.integers(1, 4, 2)
            mask[i, y : y + h, x : x + w] = 1
            plane[y : y + h, x : x + w] += rng.choice([-1, 1]) * rng.uniform(200, 800)
        plane[rng.random((size, size)) < 0.03] = 0  # holes: invalid pixels
        depth[i] = np.clip(plane, 0, 65535).astype(np.uint16)
    return depth, mask


def write_set(folder: Path, n_train: int = 64, n_val: int = 16, glints: bool = True) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        depth, mask = glint_tiles(n, seed=seed, glints=glints)
        paths.append(write_tiles(folder / f"{name}.h5", depth, mask, scale=SCALE))
    return paths[0], paths[1]


def plan_cfg(train_path: Path, val_path: Path, out_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "plan",
            overrides=[
                "data=h5",
                f"data.train_path={train_path}",
                f"data.val_path={val_path}",
                f"out_dir={out_dir}",
                "name=tiny",
                "device=cpu",
                *overrides,
            ],
        )


def expected(depth: np.ndarray, mask: np.ndarray) -> dict:
    """The fingerprint's statistics computed directly on whole tiles."""
    valid = depth != 0
    mm = depth.astype(np.float64) * SCALE
    mask = mask.astype(bool)
    eight = np.ones((3, 3), bool)
    sizes, contrasts, per_tile = [], [], []
    for d, m, v in zip(mm, mask, valid):
        labels, n = ndimage.label(m, structure=eight)
        per_tile.append(n)
        for k in range(1, n + 1):
            glint = labels == k
            sizes.append(int(glint.sum()))
            ring = ndimage.binary_dilation(glint, structure=eight, iterations=3) & ~m & v
            if ring.any() and (glint & v).any():
                contrasts.append(abs(np.median(d[glint & v]) - np.median(d[ring])))
    return {
        "valid_share": valid.mean(),
        "depth_mm": np.percentile(mm[valid], [0.5, 50, 99.5]),
        "glint_share": (mask & valid).sum() / valid.sum(),
        "empty_tile_share": np.mean(np.array(per_tile) == 0),
        "glints": len(sizes),
        "glint_size_px": np.percentile(sizes, [5, 50, 95]),
        "glint_contrast_mm": np.percentile(contrasts, [5, 50, 95]),
    }


def test_fingerprint_matches_direct_statistics(tmp_path: Path) -> None:
    train_path, val_path = write_set(tmp_path, n_train=40, n_val=12)
    dm = GlintDataModule(train_path=str(train_path), val_path=str(val_path), batch_size=8)
    dm.setup()
    fp = fingerprint(dm.datasets, max_tiles=1000, seed=0, split_by=dm.split_by)
    assert fp["depth_units"] == f"uint16 x {SCALE:g} mm" and fp["frames"] is False
    for name, path in (("train", train_path), ("val", val_path)):
        got = fp["splits"][name]
        depth, mask = glint_tiles(40 if name == "train" else 12, seed=0 if name == "train" else 1)
        want = expected(depth, mask)
        assert got["tiles"] == len(depth) and got["tile"] == [32, 32] and not got["sampled"]
        assert got["files"] == [str(path)]
        for key in ("valid_share", "glint_share", "empty_tile_share"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key
        assert got["glints"] == want["glints"]
        for key in ("depth_mm", "glint_size_px", "glint_contrast_mm"):
            assert list(got[key].values()) == pytest.approx(want[key], abs=1e-3), key
    files = {f["path"]: f for f in fp["files"]}
    assert files[str(train_path)]["mm_per_unit"] == SCALE and files[str(train_path)]["fingerprint"].startswith("sha")


def test_fingerprint_samples_large_splits(tmp_path: Path) -> None:
    train_path, val_path = write_set(tmp_path, n_train=40, n_val=12)
    dm = GlintDataModule(train_path=str(train_path), val_path=str(val_path), batch_size=8)
    dm.setup()
    a = fingerprint(dm.datasets, max_tiles=10, seed=3)["splits"]["train"]
    b = fingerprint(dm.datasets, max_tiles=10, seed=3)["splits"]["train"]
    assert a["sampled"] and a["tiles_read"] == 10 and a["tiles"] == 40
    assert a == b  # seeded: the same sample


def test_depth_rule_covers_large_glints_and_keeps_a_bottleneck() -> None:
    small = choose_depth((128, 128), 3.0)
    assert receptive_field(small.value) >= 48 and receptive_field(small.value - 1) < 48
    large = choose_depth((256, 256), 60.0)
    assert receptive_field(large.value) >= 180 and receptive_field(large.value - 1) < 180
    assert 48 >> choose_depth((48, 48), 40.0).value >= 4  # capped by the tile: the bottleneck keeps 4 px
    with pytest.raises(GlintError, match="too small"):
        choose_depth((6, 6), 2.0)


def test_batch_rule_prefers_small_batches_while_the_device_is_busy() -> None:
    t = [StepTiming(16, b, False, False, s, 0.0) for b, s in ((8, 0.10), (32, 0.35))]
    assert choose_batch(t).batch_size == 8  # 80 vs 91 tiles/s: within 80 %
    t = [StepTiming(16, b, False, False, s, 0.0) for b, s in ((8, 0.10), (32, 0.10))]
    assert choose_batch(t).batch_size == 32  # a GPU-like device: 4x the tiles in the same time


def test_width_rule_takes_the_widest_network_that_sees_enough_tiles() -> None:
    def widths(steps: dict[int, int], batch: int = 8) -> dict:
        t = StepTiming(0, batch, False, False, 0.1, 0.0)
        return {w: (t, Budget(60, 0, 0, 0.1, 0, 0, 0, steps=n)) for w, n in steps.items()}

    assert tiles_wanted(16) == 4 * tiles_wanted(8) and tiles_wanted(32) == 4 * tiles_wanted(16)  # grows as width^2
    want = {w: tiles_wanted(w) // 8 for w in (8, 16, 32)}  # in steps of batch 8
    assert choose_width(widths({8: 3 * want[16], 16: want[16], 32: want[32] - 1})) == 16
    assert choose_width(widths({8: 3 * want[16], 16: want[16] - 1})) == 8
    assert choose_width(widths({16: 5 * want[32], 32: want[32]})) == 32
    assert choose_width(widths({16: want[16] // 4, 32: want[32] // 4}, batch=32)) == 32  # batch 32: 4x the tiles
    assert choose_width(widths({8: 50, 16: 60})) == 8  # none sees enough: the narrowest, whatever its steps
    # the measured cases (runs/planning.py): demo at 26 s and at 77 s, sparse128 and blobs48 at 3 min
    assert choose_width(widths({8: 696, 16: 540, 32: 146})) == 8
    assert choose_width(widths({8: 2436, 16: 1926, 32: 650})) == 16
    assert choose_width(widths({8: 1792, 16: 1182, 32: 348})) == 8
    assert choose_width(widths({8: 3108 * 4, 16: 7264, 32: 2748})) == 16


def test_focal_alpha_weighs_rare_glints_up() -> None:
    assert loss_choices(0.02, 0.2)[1].value == 0.25  # the quickstart's, at 1 % and more
    rare = loss_choices(0.0004, 0.4)[1]
    assert rare.key == "loss.terms.focal.alpha" and rare.value == pytest.approx(1 - 0.02)


def test_clip_and_post_processing_rules() -> None:
    assert depth_clip_choice({"p0.5": 900.5, "p50": 1000.0, "p99.5": 1100.25}).value == [900.5, 1100.25]
    assert depth_clip_choice({"p0.5": 1000.0, "p50": 1000.0, "p99.5": 1000.0}).value is None  # nothing to clip to
    assert depth_clip_choice(None).value is None
    assert postprocess_choice({"p5": 1, "p50": 4, "p95": 9}).value is True
    assert postprocess_choice({"p5": 4, "p50": 5, "p95": 30}).value is False


def test_budget_is_filled_and_a_budget_without_room_for_an_epoch_is_refused() -> None:
    b = solve_budget(Budget(120, 10, 3, 0.05, 2, 3, 4), n_train=1000, batch=8)
    assert b.planned_s <= 120 * TARGET + 1e-6 and b.planned_s >= 120 * TARGET - b.step_s * b.epochs - b.validation_s
    room = 120 * TARGET - 10 - 3 - 3 - 4
    assert b.validations * b.validation_s <= max(VALIDATION_SHARE * room, b.validation_s)  # 5 %: two rounds of 2 s
    assert b.validations == 2 and b.epochs % b.validate_every == 0
    assert b.steps == b.epochs * b.steps_per_epoch and b.steps_per_epoch <= 125
    with pytest.raises(GlintError, match="too small for one epoch"):
        solve_budget(Budget(20, 10, 3, 0.05, 2, 3, 4), n_train=1000, batch=8)


def test_plan_composes_and_trains_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_path, val_path = write_set(tmp_path / "data")
    monkeypatch.setattr(plan_app, "import_seconds", lambda: 0.5)  # in-process: the imports are done already
    cfg = plan_cfg(train_path, val_path, tmp_path / "plans", "budget=0.15")
    exp = plan_app.plan(cfg)
    fp = json.loads((tmp_path / "plans" / "tiny.fingerprint.json").read_text())
    assert fp["splits"]["train"]["tiles"] == 64 and exp == tmp_path / "plans" / "experiment" / "tiny.yaml"
    text = exp.read_text()
    assert text.startswith("# @package _global_") and "override /data: h5" in text
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run = compose(
            "train",
            overrides=[
                f"hydra.searchpath=[file://{tmp_path / 'plans'}]",
                "experiment=tiny",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.outputs_root={tmp_path}",
                "logger=csv",
            ],
        )
    assert run.data.train_path == str(train_path) and run.scheduler.interval == "step"
    train_fp = fp["splits"]["train"]
    assert list(run.data.depth_clip) == [train_fp["depth_mm"]["p0.5"], train_fp["depth_mm"]["p99.5"]]
    assert train_fp["glint_size_px"]["p50"] <= 4 and run.calibrate_postprocess is True, "1-3 px glints are small"
    h, m, s = (int(x) for x in run.trainer.max_time.split(":")[1:])
    assert h * 3600 + m * 60 + s <= 0.2 * 60  # the safety net is inside the budget
    assert run.scheduler.warmup_epochs + run.scheduler.scheduler.T_max == run.trainer.max_steps
    train(run)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < summary["global_step"] <= run.trainer.max_steps and summary["best_score"] is not None
    assert summary["threshold"]["postprocess"]["metric"] == "iou", "the post-processing search ran at the end"
    stored = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["hyper_parameters"]["config"]["data"]["depth_clip"] == list(run.data.depth_clip)
    assert stored["state_dict"]["depth_input.low"] == pytest.approx(run.data.depth_clip[0])


def test_the_plan_names_the_files_as_given_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = plan_cfg(Path("a.h5"), Path("v.h5"), tmp_path, "data.train_path=[a.h5,'rec/*.h5']").data
    paths = {c.key: c.value for c in plan_app.data_choices(data)}
    assert paths["data.train_path"] == [str(tmp_path / "a.h5"), str(tmp_path / "rec" / "*.h5")]
    assert paths["data.val_path"] == str(tmp_path / "v.h5") and paths["data.test_path"] is None


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no_glint", "no glint"),
        ("handful", "training tiles; a plan needs"),
        ("tiny_budget", "too small for one epoch"),
        ("device", "device=tpu"),
        ("zero_budget", "budget=0"),
    ],
)
def test_bad_input_is_one_error_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, match: str
) -> None:
    monkeypatch.setattr(plan_app, "import_seconds", lambda: 0.5)
    n_train = 6 if case == "handful" else 64
    train_path, val_path = write_set(tmp_path / "data", n_train=n_train, glints=case != "no_glint")
    extra = {"tiny_budget": ["budget=0.01"], "device": ["device=tpu"], "zero_budget": ["budget=0"]}.get(case, [])
    with pytest.raises(GlintError, match=match) as err:
        plan_app.plan(plan_cfg(train_path, val_path, tmp_path / "plans", *extra))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "plans").exists()


def test_console_script_refuses_an_unknown_device_with_exit_2(tmp_path: Path) -> None:
    result = run_cli("glint_lightning.plan", "device=tpu", f"out_dir={tmp_path / 'plans'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: device=tpu: unknown device; use auto, cpu, cuda or cuda:<index>"
    ]
    assert not (tmp_path / "plans").exists()


def test_unknown_cuda_index_is_refused() -> None:
    with pytest.raises(GlintError, match="cuda:99"):
        resolve_device("cuda:99")


@pytest.mark.gpu
def test_steps_are_timed_on_the_gpu_with_their_memory_peak(tmp_path: Path) -> None:
    train_path, val_path = write_set(tmp_path)
    dm = GlintDataModule(train_path=str(train_path), val_path=str(val_path), batch_size=8)
    dm.setup()
    cfg = plan_app.module_config(16, 3, 0.25, 6e-3)
    device = resolve_device("cuda")
    fp32 = time_steps(cfg, dm.datasets["train"], 8, device, stats=dm.depth_stats)
    bf16 = time_steps(cfg, dm.datasets["train"], 8, device, channels_last=True, bf16=True, stats=dm.depth_stats)
    for t in (fp32, bf16):
        assert t.step_s > 0 and 0 < t.memory_mb < torch.cuda.get_device_properties(device).total_memory / 2**20
    assert bf16.bf16 and bf16.channels_last
