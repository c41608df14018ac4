"""`python -m glint_lightning.predict ckpt_path=run/checkpoints/best.ckpt input=frames.h5 output=masks.h5`

Streams full depth frames of any size through the trained model (overlapping windows of the training tile size
blended with a gaussian, or `mode=full`) and writes `prob` (float16) and `mask` (uint8) of each frame's size.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from glint_lightning.data.h5 import depth_and_validity
from glint_lightning.errors import GlintError, exit_on_user_error
from glint_lightning.inference import FramePredictor
from glint_lightning.module import GlintModule

DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,  # required: a .ckpt from glint_lightning.train
    "input": None,  # required: HDF5 file with frames (N, H, W) or (N, 1, H, W)
    "output": None,  # required: HDF5 file to write prob and mask into
    "key": "frames",  # dataset of depth frames in `input`
    "valid_key": None,  # optional dataset of valid pixels; else depth 0/NaN is invalid
    "scale": None,  # mm per stored unit; null = the dataset's `scale` attribute, else 1
    "window": None,  # window size (int or [h, w]); null = the checkpoint's training tile size
    "overlap": 0.5,
    "sigma": 0.125,  # gaussian sigma as a share of the window
    "batch_size": 16,
    "mode": "window",  # window | full (one forward pass per frame, padded to the model's stride)
    "threshold": None,  # null = the checkpoint's threshold
    "device": "auto",  # auto | cpu | cuda
    "precision": "32",  # 32 | bf16 | 16
    "overwrite": False,
}


def _window(value: Any, module: GlintModule) -> tuple[int, int]:
    if value is None:
        value = module.hparams.get("tile_size")
        if not value:
            raise GlintError("window is not set and the checkpoint records no tile size; pass window=256")
    size = (int(value), int(value)) if isinstance(value, int | float) else tuple(int(v) for v in value)
    if len(size) != 2 or min(size) < 8:
        raise GlintError(f"window={value}; pass one size or [h, w], at least 8 px")
    return size


def _frames(f: h5py.File, path: str, key: str) -> h5py.Dataset:
    if key not in f:
        raise GlintError(f"{path}: no dataset '{key}' (found {sorted(f.keys())}); pass key=<frames dataset>")
    ds = f[key]
    if not (ds.ndim == 3 or (ds.ndim == 4 and ds.shape[1] == 1)):
        raise GlintError(f"{path}: '{key}' has shape {ds.shape}; expected (N, H, W) or (N, 1, H, W)")
    return ds


def predict_file(args: Any) -> dict[str, Any]:
    """Predict every frame of args.input into args.output (written to a temporary file, renamed at the end)."""
    for name in ("ckpt_path", "input", "output"):
        if not args[name]:
            raise GlintError(f"{name} is not set; usage: {__doc__.strip().splitlines()[0]}")
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise GlintError(f"{out} exists; pass another output= or overwrite=true")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    module = GlintModule.from_checkpoint(args.ckpt_path, map_location=device)
    threshold = float(module.hparams.threshold if args.threshold is None else args.threshold)
    window = _window(args.window, module)
    predictor = FramePredictor(module, window, args.overlap, args.batch_size, args.sigma, args.mode, args.precision)
    src = Path(args.input)
    if not src.is_file():
        raise GlintError(f"{src}: no such file; pass input=<frames.h5>")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    start, pixels = time.perf_counter(), 0
    try:
        with h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
            frames = _frames(f, str(src), args.key)
            n, (height, width) = frames.shape[0], frames.shape[-2:]
            scale = float(args.scale if args.scale is not None else frames.attrs.get("scale", 1.0))
            valid_ds = f[args.valid_key] if args.valid_key else None
            prob_ds = g.create_dataset("prob", (n, height, width), "float16", chunks=(1, height, width))
            mask_ds = g.create_dataset("mask", (n, height, width), "uint8", chunks=(1, height, width))
            for i in tqdm(range(n), desc=f"predict {src.name}", unit="frame", disable=n < 2):
                stored = frames[i].reshape(height, width)
                depth, valid = depth_and_validity(stored, scale, valid_ds[i] if valid_ds is not None else None)
                prob = predictor(torch.from_numpy(depth), torch.from_numpy(valid)).numpy()
                prob_ds[i] = prob.astype(np.float16)
                mask_ds[i] = ((prob >= threshold) & valid).astype(np.uint8)
                pixels += height * width
            g.attrs.update(
                {
                    "checkpoint": str(args.ckpt_path),
                    "threshold": threshold,
                    "window": window,
                    "overlap": args.overlap,
                    "mode": args.mode,
                }
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return {
        "output": str(out),
        "frames": n,
        "size": (height, width),
        "threshold": threshold,
        "megapixels_per_s": pixels / 1e6 / max(seconds, 1e-9),
        "window": window,
        "mode": args.mode,
    }


def main(argv: list[str]) -> None:
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_dotlist(argv))
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise GlintError(f"predict: unknown option(s) {sorted(unknown)}; valid options are {sorted(DEFAULTS)}")
    r = predict_file(args)
    print(
        f"wrote {r['output']}: prob (float16) and mask (uint8) for {r['frames']} frame(s) of {r['size'][0]}x"
        f"{r['size'][1]}; threshold {r['threshold']}, {r['mode']} mode, window {r['window'][0]}x{r['window'][1]}, "
        f"{r['megapixels_per_s']:.2f} megapixels/s"
    )


if __name__ == "__main__":
    with exit_on_user_error():
        main(sys.argv[1:])
