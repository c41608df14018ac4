"""Full-frame prediction against MONAI's sliding_window_inference on the same network and windows: speed (MP/s,
ratio to MONAI) and mean |prob difference| to one whole-frame forward pass, for FramePredictor's window and full
modes and their test-time augmentations.

    python -m benchmarks.predict_vs_monai [--frame 700 1000] [--window 64] [--overlap 0.5] [--sigma 0.125]
        [--batch-size 16] [--rounds 5] [--device cpu|cuda] [--precision 32|bf16] [--threads N] [--tta]

The methods run in turn within each round (the order rotating), so a load change on the machine hits them alike;
the ratio to MONAI is taken per round, and its median and range over the rounds are printed. Needs MONAI
(`pip install 'glint-lightning[bench]'`); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch

from benchmarks.common import Stopwatch
from glint_lightning.inference.frames import FramePredictor
from glint_lightning.module import GlintModule


def unet(base: int = 16, depth: int = 3) -> GlintModule:
    """The U-Net of the issue's measurements, random weights (seeded), depth statistics of a real camera."""
    torch.manual_seed(0)
    module = GlintModule(
        model={"_target_": "glint_lightning.models.UNet", "base_channels": base, "depth": depth},
        loss={"_target_": "glint_lightning.losses.BCELoss"},
        optimizer={"_target_": "torch.optim.Adam"},
    )
    module.set_depth_stats(1000.0, 50.0)
    return module.eval()


def monai_predictor(module, window: int, overlap: float, sigma: float, batch: int, autocast) -> Callable:
    """What a MONAI user writes: normalise the frame, sliding_window_inference with gaussian blending of the
    network's probabilities, result to the CPU (as FramePredictor returns it)."""
    from monai.inferers import sliding_window_inference

    def predict(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        device = module.depth_mean.device
        depth, valid = depth.to(device), valid.to(device)
        x = torch.where(valid, (depth - module.depth_mean) / module.depth_std, 0.0)[None, None]

        def net(tiles: torch.Tensor) -> torch.Tensor:
            with autocast():
                return torch.sigmoid(module.model(tiles).float())

        prob = sliding_window_inference(
            x, window, batch, net, overlap=overlap, mode="gaussian", sigma_scale=sigma, padding_mode="replicate"
        )
        return prob[0, 0].cpu()

    return predict


def _full_tta(name: str) -> str | None:
    """The tta of a full-mode row (the reference for the rows with that tta), None for the other rows."""
    return (name.partition("tta=")[2] or "none") if "mode=full" in name else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, nargs=2, default=[700, 1000])
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=0.125)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--tta", action="store_true", help="also time tta=flip and tta=d4 in both modes")
    args = parser.parse_args()
    try:
        import monai
    except ImportError:
        print("predict_vs_monai: MONAI is not installed; pip install 'glint-lightning[bench]' (or monai) to run it")
        sys.exit(0)

    if args.threads:
        torch.set_num_threads(args.threads)
    module = unet().to(args.device)
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(
        torch.randn(1, 1, args.frame[0] + 8, args.frame[1] + 8, generator=gen), 9, 1
    )
    depth = 1000 + 50 * smooth[0, 0] / smooth.std()
    valid = torch.rand(*args.frame, generator=gen) > 0.02
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = (lambda: torch.autocast(torch.device(args.device).type, dtype=dtype)) if dtype else nullcontext
    window = (args.window, args.window)

    def ours(mode: str, tta: str = "none") -> FramePredictor:
        return FramePredictor(module, window, args.overlap, args.batch_size, args.sigma, mode, args.precision, tta)

    # MONAI gets the network as loaded (FramePredictor switches its own to channels_last), and, to show how much of
    # the difference that layout is, a channels_last copy too
    as_loaded = copy.deepcopy(module)
    channels_last = copy.deepcopy(module).to(memory_format=torch.channels_last)
    monai_args = (args.window, args.overlap, args.sigma, args.batch_size, autocast)
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "MONAI sliding_window_inference": monai_predictor(as_loaded, *monai_args),
        "MONAI, network in channels_last": monai_predictor(channels_last, *monai_args),
        "FramePredictor mode=window": ours("window"),
        "FramePredictor mode=full": ours("full"),
    }
    if args.tta:
        for tta in ("flip", "d4"):
            methods[f"FramePredictor mode=window tta={tta}"] = ours("window", tta)
            methods[f"FramePredictor mode=full tta={tta}"] = ours("full", tta)

    names = list(methods)
    with torch.no_grad():  # the first call of each is the warm-up, and gives the agreement figures
        probs = {name: fn(depth, valid) for name, fn in methods.items()}
    full = {tta: probs[name] for name in names if (tta := _full_tta(name)) is not None}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with torch.no_grad(), Stopwatch() as watch:
                methods[name](depth, valid)
            seconds[name].append(watch.seconds)

    mp = args.frame[0] * args.frame[1] / 1e6
    monai_s = seconds[names[0]]
    print(
        f"predict vs MONAI {monai.__version__}: U-Net(16, depth 3, stride {module.model.stride}), "
        f"{args.frame[0]}x{args.frame[1]} frame, {args.window}px windows, overlap {args.overlap}, gaussian sigma "
        f"{args.sigma}, batch {args.batch_size}, device={args.device}, precision {args.precision}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(f"  {'':40s} {'MP/s':>7s}  {'x MONAI (median, min-max over rounds)':38s} mean|dprob| to mode=full, same tta")
    for name in names:
        ratios = [m / s for m, s in zip(monai_s, seconds[name])]
        rate = mp / statistics.median(seconds[name])
        spread = f"{statistics.median(ratios):5.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        delta = (probs[name] - full[name.partition("tta=")[2] or "none"]).abs().mean().item()
        print(f"  {name:40s} {rate:7.3f}  {spread:38s} {delta:.4f}")


if __name__ == "__main__":
    main()
