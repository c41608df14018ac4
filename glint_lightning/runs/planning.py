"""A training plan from a data set's fingerprint and steps timed on the device: every choice with the reason for it.

The rules (nnU-Net's idea, planned for wall-clock time instead of a memory target):
- network depth from the tile size and the glint sizes: the receptive field covers 3x the large (95th percentile)
  glints' extent, and the bottleneck keeps at least MIN_BOTTLENECK_PX pixels;
- base channels and batch size from real training steps timed on the device: per width the smallest batch that
  keeps the device busy (within BUSY of the best tiles/s: more small steps beat fewer large ones at a fixed time),
  then the widest network that still sees `tiles_wanted(width)` training tiles (steps x batch) in the budget;
- steps, warm-up and a per-step cosine that fill the budget less the fixed costs (start-up, validations,
  calibration, test), `trainer.max_time` as the safety net;
- depth clipped to the training depth's 0.5th/99.5th percentiles before normalising;
- small glints: the end-of-run calibration also searches post-processing (min_size, fill_holes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from glint_lightning.runs.step_timing import StepTiming
from glint_lightning.utils.errors import GlintError

MIN_BOTTLENECK_PX = 4  # the deepest feature map keeps at least this many pixels a side
MIN_RECEPTIVE_PX = 48  # context beyond the glint itself (surface shape, noise), also for 1-3 px glints
MAX_DEPTH = 5
GLINT_CONTEXT = 3  # the receptive field spans this many times a large glint: the glint and its surroundings
BUSY = 0.8  # a smaller batch is chosen while its tiles/s is at least this share of the best batch's
# Training tiles a width wants before a wider network is worth its slower steps: TILES_PER_CHANNEL_SQ x width^2
# (parameters and work per tile grow with width^2, and a larger network wants data in proportion). Measured at the same
# wall time on the idle 2-core CPU (benchmarks/plan_budget.py layouts), narrower with more steps won where the wider one
# saw fewer than 48 tiles a channel^2: demo 26 s, base 8 (696 steps of 8) 0.745 vs 16 (540) 0.722; sparse128 3 min,
# 8 (1792) 0.938 vs 16 (1182, 37 a channel^2) 0.433; blobs48 3 min, 16 (~7000) 0.90 vs 32 (2748) 0.72; and lost where
# it saw more: demo 77 s, 16 (1926, 60 a channel^2) 0.818 vs 8 (2436) 0.814
TILES_PER_CHANNEL_SQ = 48
MIN_TILES = 16  # fewer training tiles than this is not a data set to plan for
MIN_STEPS = 100  # a "epoch" of a large set: at least this many steps, else the budget is too small
MAX_VALIDATIONS = 8  # validation rounds in a run at most (each is a full pass over the val split)
VALIDATION_SHARE = 0.05  # of the training room that validation rounds may take (the one at the end always runs)
TARGET = 1.0  # plan to end at the budget: the model of the run is measured (within 5 % on the CPU), the
# fit has trainer.max_time as a safety net
# A step of the real training loop (DataLoader, logging, callbacks) vs the step timed here: 1.12 measured on the idle
# 2-core CPU on the demo set (36 vs 32 ms) and on benchmarks/plan_layouts sparse128 (130 vs 116 ms)
LIGHTNING_STEP_OVERHEAD = 1.12
EVAL_OVERHEAD = 1.3  # a validation pass vs the timed forward passes: metrics, logging, the checkpoint save
TEST_OVERHEAD = 2.0  # the test pass also counts glints (connected components on the CPU)
# Trainer and loaders start, first-step warm-up: 0.5 s measured on the CPU (the first epoch 0.4 s longer than the
# next); CUDA (context, kernel selection) is modelled, not measured
FIT_START_S = {"cpu": 1.0, "cuda": 8.0}
CKPT_S = 0.3  # loading the best checkpoint for calibration and for the test, each (0.2 s measured on the CPU)
BASE_LR, BASE_BATCH, MAX_LR = 6.0e-3, 8, 1.0e-2  # Adam + BatchNorm: 6e-3 at batch 8 (quickstart), sqrt-scaled
MIN_WARMUP, WARMUP_SHARE = 20, 0.04
RARE_SHARE, MAX_ALPHA = 0.01, 0.99  # glint shares below RARE_SHARE get a focal alpha above the default
SMALL_GLINT_PX = 4  # median glint size (px) up to which the end of training also searches post-processing
# The post-processing search's CPU work (connected components per threshold x min_size) beyond the validation pass,
# per million val pixels, whatever the network: 1.3-1.5 s on the shared 2-core dev CPU under load, 256 demo tiles of
# 64 px (benchmarks/postprocess_search.py)
POSTPROCESS_S_PER_MPX = 1.5


def receptive_field(depth: int) -> int:
    """Receptive field (px) of the U-Net's encoder: two 3x3 convolutions per level, 2x2 max-pooling between."""
    return 1 + 4 * (2 ** (depth + 1) - 1) + (2**depth - 1)


@dataclass
class Choice:
    key: str  # dotted config key, or a label starting with '#' for what is not a config key
    value: Any
    why: str


@dataclass
class Budget:
    """How the budget is spent, in seconds; `modelled` names what was not measured."""

    total_s: float
    startup_s: float
    fit_start_s: float
    step_s: float
    validation_s: float
    calibration_s: float
    test_s: float
    steps: int = 0
    steps_per_epoch: int = 0
    epochs: int = 0
    validate_every: int = 1
    limit_batches: int | None = None
    modelled: list[str] = field(default_factory=list)

    @property
    def validations(self) -> int:
        return self.epochs // self.validate_every

    @property
    def train_s(self) -> float:
        """From the start of fit to its end: steps and validations."""
        return self.fit_start_s + self.steps * self.step_s + self.validations * self.validation_s

    @property
    def planned_s(self) -> float:
        return self.startup_s + self.train_s + self.calibration_s + self.test_s


def choose_depth(tile: tuple[int, int], extent_p95: float | None) -> Choice:
    """Shallowest U-Net whose receptive field covers 3x the large glints (and MIN_RECEPTIVE_PX), as deep as the tile
    allows with a bottleneck of MIN_BOTTLENECK_PX."""
    side = min(tile)
    deepest = min(MAX_DEPTH, int(math.log2(side / MIN_BOTTLENECK_PX))) if side >= 2 * MIN_BOTTLENECK_PX else 0
    if deepest < 1:
        raise GlintError(f"tiles are {tile[0]}x{tile[1]} px: too small for a U-Net; use tiles of at least 16 px")
    need = max(GLINT_CONTEXT * (extent_p95 or 1), MIN_RECEPTIVE_PX)
    depth = next((d for d in range(1, deepest + 1) if receptive_field(d) >= need), deepest)
    why = (
        f"receptive field {receptive_field(depth)} px >= {GLINT_CONTEXT} x the 95th-percentile glint extent "
        f"({extent_p95 or 0:g} px) and >= {MIN_RECEPTIVE_PX} px of context"
    )
    if receptive_field(depth) < need:
        why = f"the deepest the {side} px tiles allow; receptive field {receptive_field(depth)} px"
    return Choice("model.depth", depth, why + f"; bottleneck {side >> depth} px")


def solve_budget(budget: Budget, n_train: int, batch: int) -> Budget:
    """Fill the budget: steps, epochs (or capped epochs of a large set), validation rounds; raises GlintError when
    one epoch does not fit. Validation rounds take at most VALIDATION_SHARE of the room (at least the one at the end):
    in a short run each round is a share of the optimizer steps."""
    full_epoch = max(n_train // batch, 1)
    need_epoch = min(full_epoch, MIN_STEPS)
    room = budget.total_s * TARGET - budget.startup_s - budget.fit_start_s - budget.calibration_s - budget.test_s
    allowed = max(1, min(MAX_VALIDATIONS, int(VALIDATION_SHARE * room / max(budget.validation_s, 1e-9))))
    validations, steps, epochs, every = 1, 0, 1, 1
    for _ in range(6):  # validation rounds depend on the epochs, which depend on the steps: settle it
        steps = int((room - validations * budget.validation_s) / budget.step_s)
        if steps < need_epoch:
            break
        epochs = max(math.ceil(steps / full_epoch), min(3, steps // MIN_STEPS))
        every = math.ceil(epochs / allowed)
        epochs = math.ceil(epochs / every) * every  # whole validation periods; each epoch stays within one pass
        if epochs // every == validations:
            break
        validations = epochs // every
    if steps >= need_epoch:  # the steps that the settled validation rounds leave
        steps = int((room - epochs // every * budget.validation_s) / budget.step_s)
    if steps < need_epoch:
        fixed = budget.startup_s + budget.fit_start_s + budget.calibration_s + budget.test_s + budget.validation_s
        least = (fixed + need_epoch * budget.step_s) / TARGET / 60
        raise GlintError(
            f"budget={budget.total_s / 60:g} is too small for one epoch: start-up, a validation, calibration and test "
            f"take ~{fixed:.0f} s and {need_epoch} steps of batch {batch} ~{need_epoch * budget.step_s:.0f} s; give "
            f"budget={math.ceil(least * 10) / 10:g} (minutes) or more"
        )
    per_epoch = min(steps // epochs, full_epoch)
    budget.steps, budget.steps_per_epoch, budget.epochs, budget.validate_every = (
        per_epoch * epochs,
        per_epoch,
        epochs,
        every,
    )
    budget.limit_batches = per_epoch if per_epoch < full_epoch else None
    return budget


def choose_batch(timings: list[StepTiming]) -> StepTiming:
    """Of one width's timings, the smallest batch within BUSY of the best tiles/s."""
    best = max(t.tiles_per_s for t in timings)
    return min((t for t in timings if t.tiles_per_s >= BUSY * best), key=lambda t: t.batch_size)


def tiles_wanted(width: int) -> int:
    """Training tiles (steps x batch) a network of this base width wants in the budget before it is chosen over a
    narrower one."""
    return TILES_PER_CHANNEL_SQ * width**2


def choose_width(per_width: dict[int, tuple[StepTiming, Budget]]) -> int:
    """The widest network that sees the training tiles it wants; else the narrowest (the most steps)."""
    enough = [w for w, (t, b) in per_width.items() if b.steps * t.batch_size >= tiles_wanted(w)]
    return max(enough) if enough else min(per_width)


def learning_rate(batch: int) -> float:
    return round(min(BASE_LR * math.sqrt(batch / BASE_BATCH), MAX_LR), 5)


def schedule(steps: int) -> tuple[int, int]:
    """(warm-up steps, cosine steps after it)."""
    warmup = min(max(MIN_WARMUP, round(WARMUP_SHARE * steps)), max(steps // 5, 1))
    return warmup, max(steps - warmup, 1)


def choose_split_by(frames: bool, n_files: int) -> Choice:
    if frames:
        return Choice("data.split_by", "frame", "every file records frame ids: tiles of one frame stay on one side")
    if n_files >= 4:
        return Choice("data.split_by", "file", f"no frame ids; {n_files} files: hold out whole files")
    return Choice("data.split_by", "tile", "no frame ids and few files: tiles are drawn one by one")


def loss_choices(share: float, empty_share: float) -> list[Choice]:
    """Focal + Dice: the focal term down-weighs the many easy background pixels, the batch-wide Dice term is
    independent of how rare glints are; the focal alpha (the glint pixels' weight) follows the glint share.

    At 1 % and more, the quickstart's 0.25. Below, alpha = 1 - sqrt(share), which weighs a glint pixel about
    1/sqrt(share) times a background one: on 128 px tiles with 0.03 % glint pixels (benchmarks/plan_layouts.py
    sparse128, 3 minutes on the CPU) alpha 0.5 never left the all-background answer (val IoU 0.00) where 0.98 did."""
    alpha = 0.25 if share >= RARE_SHARE else round(min(1 - math.sqrt(share), MAX_ALPHA), 3)
    why = (
        f"glints are {share:.2%} of valid pixels ({empty_share:.0%} of tiles have none): focal down-weighs easy "
        "background, batch-wide Dice does not depend on the share"
    )
    a_why = (
        "the quickstart's focal alpha, for a glint share of 1 % or more"
        if alpha == 0.25
        else "rare glints (< 1 %): 1 - sqrt(share) weighs a glint pixel ~1/sqrt(share) x a background one"
    )
    return [Choice("#loss", "hybrid (focal + dice)", why), Choice("loss.terms.focal.alpha", alpha, a_why)]


def depth_clip_choice(depth_mm: dict[str, float] | None) -> Choice:
    """Clip depth to the training depth's 0.5th/99.5th percentiles before normalising: a few far-off depths (sensor
    outliers, background through a gap) then neither stretch the std nor reach the network as extreme values."""
    low, high = (depth_mm or {}).get("p0.5"), (depth_mm or {}).get("p99.5")
    if low is None or high is None or not low < high:
        return Choice("data.depth_clip", None, "no depth spread to clip to (valid depth is constant or absent)")
    return Choice(
        "data.depth_clip",
        [low, high],
        "valid depth's p0.5 / p99.5 (mm): outliers beyond them neither stretch the mean/std nor reach the network",
    )


def postprocess_choice(size_px: dict[str, float] | None) -> Choice:
    """Search min_size / fill_holes on val at the end of training when glints are small (median <= SMALL_GLINT_PX):
    there a few stray pixels are a large share of what is predicted, and removing them is what the search tries."""
    median = (size_px or {}).get("p50") or 0
    if median <= SMALL_GLINT_PX:
        return Choice(
            "calibrate_postprocess",
            True,
            f"small glints (median {median:g} px): choose min_size / fill_holes on val after training (kept only "
            "when they beat none)",
        )
    return Choice("calibrate_postprocess", False, f"glints of median {median:g} px: no post-processing search")
