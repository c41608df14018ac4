"""What the end-of-run post-processing search (train's calibrate_postprocess=true, glint-eval calibrate=true) costs
beyond the threshold calibration it replaces: seconds per million val pixels, which glint-plan's
runs/planning.POSTPROCESS_S_PER_MPX budgets for. The extra is CPU work (connected components per threshold and
min_size), so it is measured against calibrate_threshold on the same loader in the same run, for two widths.

    python -m benchmarks.postprocess_search [--tiles 256] [--tile 64] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import CACHE
from glint_lightning.data import GlintDataModule
from glint_lightning.inference.calibration import calibrate_postprocess, calibrate_threshold
from glint_lightning.module import GlintModule
from glint_lightning.runs.planning import POSTPROCESS_S_PER_MPX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    demo = {"cache_dir": str(CACHE), "n_train": 64, "n_val": args.tiles, "n_test": 0, "tile": args.tile, "seed": 0}
    dm = GlintDataModule(demo=demo, batch_size=16, eval_batch_size=64, norm_samples=16)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.eval_loader("val", shard=False)
    mpx = args.tiles * args.tile**2 / 1e6
    for base in (8, 16):
        model = {"_target_": "glint_lightning.models.UNet", "base_channels": base, "depth": 3}
        module = GlintModule(model=model, loss={"_target_": "glint_lightning.losses.BCELoss"}, optimizer={})
        module.set_depth_stats(*dm.depth_stats)
        module = module.to(args.device).eval()
        extra = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            calibrate_threshold(module, loader, args.device)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            calibrate_postprocess(module, loader, args.device)
            extra.append((time.perf_counter() - start - plain, plain))
        added, plain = statistics.median(e for e, _ in extra), statistics.median(p for _, p in extra)
        print(
            f"base {base}: threshold only {plain:.2f} s, the search adds {added:.2f} s = {added / mpx:.2f} s per "
            f"million val pixels (budgeted: {POSTPROCESS_S_PER_MPX:g}; x{(plain + added) / plain:.2f} the threshold "
            f"calibration) on {args.tiles} tiles of {args.tile} px, {args.device}"
        )


if __name__ == "__main__":
    main()
