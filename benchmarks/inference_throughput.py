"""Full-frame prediction in megapixels/s: FramePredictor's batched sliding window (Gaussian blending) and its
single-pass `full` mode (each with the network in channels_last, as FramePredictor runs it, and as loaded),
against a naive loop that runs one window at a time and averages overlaps. (MONAI: benchmarks/predict_vs_monai.py.)

    python -m benchmarks.inference_throughput [--frame 512 640] [--window 64] [--overlap 0.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import Stopwatch, config, median_rate
from glint_lightning.data.windows import window_starts
from glint_lightning.inference.frames import FramePredictor
from glint_lightning.train import build_module


def naive(module, depth: torch.Tensor, valid: torch.Tensor, window: int, overlap: float) -> torch.Tensor:
    """What a hand-written script does: each window alone through the network, overlaps averaged."""
    total, count = torch.zeros_like(depth), torch.zeros_like(depth)
    for y in window_starts(depth.shape[0], window, overlap):
        for x in window_starts(depth.shape[1], window, overlap):
            d, v = depth[y : y + window, x : x + window], valid[y : y + window, x : x + window]
            total[y : y + window, x : x + window] += torch.sigmoid(module(d[None, None], v[None, None]))[0, 0]
            count[y : y + window, x : x + window] += 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, nargs=2, default=[512, 640])
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    module = build_module(config("model.base_channels=16", "model.depth=3")).eval()
    depth = 1000 + 50 * torch.rand(*args.frame)
    valid = torch.rand(*args.frame) > 0.02
    mp = args.frame[0] * args.frame[1] / 1e6

    def timed(fn) -> tuple[float, float]:
        with torch.no_grad(), Stopwatch() as watch:
            fn()
        return mp, watch.seconds

    window = (args.window, args.window)
    loaded = copy.deepcopy(module)  # stays as loaded: FramePredictor switches `module` to channels_last
    runs = {
        "naive, one window at a time": lambda: naive(loaded, depth, valid, args.window, args.overlap),
        "FramePredictor window (batch 16), as loaded": FramePredictor(
            loaded, window, args.overlap, 16, channels_last=False
        ),
        "FramePredictor full frame, as loaded": FramePredictor(loaded, window, mode="full", channels_last=False),
        "FramePredictor window (batch 16)": FramePredictor(module, window, args.overlap, batch_size=16),
        "FramePredictor full frame": FramePredictor(module, window, mode="full"),
    }
    print(
        f"inference: U-Net(16, depth 3), {args.frame[0]}x{args.frame[1]} frame, {args.window}px windows, "
        f"overlap {args.overlap}, {torch.get_num_threads()} threads, median of {args.rounds}"
    )
    base = None
    for name, fn in runs.items():
        call = fn if name.startswith("naive") else (lambda fn=fn: fn(depth, valid))
        rate = median_rate(lambda call=call: timed(call), args.rounds)
        base = base or rate
        print(f"  {name:45s} {rate:7.3f} MP/s  {rate / base:6.2f}x")


if __name__ == "__main__":
    main()
