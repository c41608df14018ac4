"""Training-step throughput of the speed options on this machine, each against plain fp32 measured in the same
run: channels_last, bf16 / fp16 autocast (trainer.precision=bf16-mixed / 16-mixed), both, and torch.compile.

    python -m benchmarks.speed_options [--device cpu|cuda] [--size 128] [--batch 8] [--steps 5] [--compile]
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from benchmarks.common import config, timed_steps
from glint_lightning.train import build_module


def tiles_per_second(
    size: int, batch: int, steps: int, device: str, *, channels_last=False, dtype=None, compile=False
) -> float:
    module = build_module(config("model.base_channels=16", "model.depth=3", "loss=dice")).to(device).train()
    if channels_last:
        module.model.to(memory_format=torch.channels_last)
    if compile:
        module.model.compile()
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    depth = 1000 + 50 * torch.rand(batch, 1, size, size, device=device)
    mask = (torch.rand_like(depth) < 0.03).float()
    valid = torch.ones_like(depth, dtype=torch.bool)
    autocast = torch.autocast(device, dtype=dtype) if dtype else nullcontext()

    def step() -> None:
        with autocast:
            loss = module.loss_fn(module(depth, valid).float(), mask, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return steps * batch / timed_steps(step, steps, device, warmup=2)  # warm-up includes compilation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    args = parser.parse_args()
    options = {
        "fp32 (baseline)": {},
        "channels_last=true": {"channels_last": True},
        "bf16-mixed": {"dtype": torch.bfloat16},
        "channels_last + bf16-mixed": {"channels_last": True, "dtype": torch.bfloat16},
    }
    if args.device == "cuda":
        options["16-mixed"] = {"dtype": torch.float16}
    if args.compile:
        options["compile=true"] = {"compile": True}
    print(f"speed options: U-Net(16, depth 3) train step, {args.size}px, batch {args.batch}, device={args.device}")
    base = None
    for name, kwargs in options.items():
        rate = tiles_per_second(args.size, args.batch, args.steps, args.device, **kwargs)
        base = base or rate
        print(f"  {name:28s} {rate:8.1f} tiles/s  {rate / base:5.2f}x")
    if args.device == "cpu":
        print("  data.pin_memory / data.persistent_workers only matter with a GPU; run this there to see them")


if __name__ == "__main__":
    main()
