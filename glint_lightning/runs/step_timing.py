"""Real training steps timed on the device a run will use: the planned GlintModule, real tiles read as the training
loader reads them, augmentation, loss, backward and an optimizer step; and the evaluation throughput of a forward
pass. What a planner chooses network width, batch size, channels_last and bf16 from."""

from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glint_lightning.data.augment import AugmentConfig, augment_batch
from glint_lightning.data.h5 import H5Tiles
from glint_lightning.module import GlintModule
from glint_lightning.utils.errors import GlintError


@dataclass(frozen=True)
class StepTiming:
    base_channels: int
    batch_size: int
    channels_last: bool
    bf16: bool
    step_s: float  # seconds per optimizer step (median of the timed steps), reading the batch included
    memory_mb: float  # peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU)

    @property
    def tiles_per_s(self) -> float:
        return self.batch_size / self.step_s


def resolve_device(name: str) -> torch.device:
    """`auto` (the GPU when there is one, else the CPU), `cpu`, `cuda` or `cuda:<index>`; anything else, or a GPU
    that is not there, is the user's mistake."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GlintError(f"device={name}: unknown device; use auto, cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise GlintError(f"device={name}: unknown device; use auto, cpu, cuda or cuda:<index>")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise GlintError(f"device={name}: no such CUDA device here; use device=cpu or device=auto")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(ds: H5Tiles, batch: int, seed: int) -> Any:
    """Endless random batches of real training tiles, (B, 1, H, W), read as the training loader reads them."""
    rng = np.random.default_rng(seed)
    while True:
        picks = rng.choice(len(ds), size=min(batch, len(ds)), replace=False)
        depth, mask, valid = ds.read_many(ds.indices[np.sort(picks)])
        yield {k: torch.from_numpy(v[:, None]) for k, v in (("depth", depth), ("mask", mask), ("valid", valid))}


def build(module_cfg: dict[str, Any], device: torch.device, channels_last: bool) -> GlintModule:
    """The GlintModule a run builds from the plan's model, loss and optimizer config, on `device`."""
    module = GlintModule(model=module_cfg["model"], loss=module_cfg["loss"], optimizer=module_cfg["optimizer"])
    if channels_last:
        module.model.to(memory_format=torch.channels_last)
    return module.to(device).train()


def time_steps(
    module_cfg: dict[str, Any],
    ds: H5Tiles,
    batch: int,
    device: torch.device,
    channels_last: bool = False,
    bf16: bool = False,
    steps: int = 3,
    warmup: int = 2,
    stats: tuple[float, float] = (0.0, 1.0),
) -> StepTiming:
    """Median seconds of `steps` training steps after `warmup` untimed ones, and the memory peak."""
    module = build(module_cfg, device, channels_last)
    module.set_depth_stats(*stats)
    optimizer = module.configure_optimizers()
    augment, g = AugmentConfig(), torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches, times = _batches(ds, batch, seed=0), []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        b = augment_batch({k: v.to(device) for k, v in next(batches).items()}, augment, g)
        with autocast:
            logits = module(b["depth"], b["valid"])
            loss = module.loss_fn(logits.float(), b["mask"], b["valid"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    ds.close()
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    base = int(module_cfg["model"].get("base_channels", 0))
    return StepTiming(base, batch, channels_last, bf16, float(np.median(times)), round(memory, 1))


def eval_tiles_per_s(
    module_cfg: dict[str, Any], ds: H5Tiles, batch: int, device: torch.device, channels_last: bool, bf16: bool
) -> float:
    """Tiles per second of a validation forward pass (no gradients), reading included; best of 2 after a warm-up."""
    module = build(module_cfg, device, channels_last).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    batches, best = _batches(ds, batch, seed=1), float("inf")
    with torch.no_grad():
        for i in range(3):
            _sync(device)
            start = time.perf_counter()
            b = {k: v.to(device) for k, v in next(batches).items()}
            with autocast:
                torch.sigmoid(module(b["depth"], b["valid"])).float().cpu()
            _sync(device)
            if i:
                best = min(best, time.perf_counter() - start)
    ds.close()
    return min(batch, len(ds)) / best
