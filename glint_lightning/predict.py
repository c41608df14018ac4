"""`glint-predict ckpt_path=run/checkpoints/best.ckpt input=frames.h5 output=masks.h5` (options: conf/predict.yaml)

Streams full depth frames of any size (an HDF5 file, or a folder of 16-bit PNG / .npy images) through the model
(overlapping windows of the training tile size blended with a gaussian, or `mode=full`) and writes `prob`
(float16) and `mask` (uint8) of each frame's size into an HDF5 file, or `<name>_mask.png` and
`<name>_overlay.png` into a folder. `ckpt_path` may also be a `.pth` or `.safetensors` file from glint-export.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from glint_lightning.checkpoints.io import atomic_output
from glint_lightning.data.h5 import depth_and_validity
from glint_lightning.inference.ensemble import Ensemble
from glint_lightning.inference.frames import FramePredictor
from glint_lightning.inference.loading import load_module, stored_postprocess
from glint_lightning.inference.postprocess import PostProcess, resolve_postprocess
from glint_lightning.module import GlintModule
from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.options import torch_device

REQUIRED = ("ckpt_path", "input", "output")
EXAMPLE = "glint-predict ckpt_path=run/checkpoints/best.ckpt input=frames.h5 output=masks.h5"


def _window(value: Any, module: GlintModule | Ensemble) -> tuple[int, int]:
    if value is None:
        value = module.tile_size if isinstance(module, Ensemble) else module.hparams.get("tile_size")
        if not value:
            raise GlintError("window is not set and the model file records no tile size; pass window=256")
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


def overlay(depth: np.ndarray, valid: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8: valid depth in grey (1st-99th percentile stretch), invalid black, glints red."""
    grey = np.zeros(depth.shape, np.float32)
    if valid.any():
        lo, hi = np.percentile(depth[valid], [1, 99])
        grey = np.where(valid, np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1), 0)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    rgb[mask.astype(bool)] = (rgb[mask.astype(bool)] * 0.3 + np.array([255, 0, 0]) * 0.7).astype(np.uint8)
    return rgb


def _folder_frames(src: Path, scale: float) -> tuple[int, Iterator[tuple[str, np.ndarray, np.ndarray]]]:
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".npy", ".tif", ".tiff"))
    if not files:
        raise GlintError(f"{src}: no .png, .tif or .npy depth images")

    def gen() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for p in files:
            stored = np.load(p) if p.suffix == ".npy" else np.asarray(Image.open(p))
            if stored.ndim != 2:
                raise GlintError(f"{p}: shape {stored.shape}; depth images must be single-channel (H, W)")
            yield (p.stem, *depth_and_validity(stored, scale))

    return len(files), gen()


def predict_file(args: DictConfig) -> dict[str, Any]:
    """Predict every frame of args.input (HDF5 file or image folder) into args.output (HDF5 file or folder).

    An HDF5 output is written to a temporary file and renamed at the end; an existing output is never replaced
    unless overwrite=true.
    """
    for name in REQUIRED:
        if OmegaConf.is_missing(args, name) or not args[name]:
            raise GlintError(f"{name} is not set; e.g. {EXAMPLE}")
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise GlintError(f"{src}: no such file or folder; pass input=<frames.h5 or a folder of depth images>")
    if out.exists() and not args.overwrite:
        raise GlintError(f"{out} exists; pass another output= or overwrite=true")
    device = torch_device(args.device)
    module = load_module(args.ckpt_path, map_location=device)
    ensemble = isinstance(module, Ensemble)  # an ensemble carries its own threshold and post-processing
    stored_threshold = module.threshold if ensemble else module.hparams.threshold
    threshold = float(stored_threshold if args.threshold is None else args.threshold)
    stored = module.postprocess if ensemble else stored_postprocess(args.ckpt_path)
    post = resolve_postprocess(args.get("postprocess"), stored)
    window = _window(args.window, module)
    predictor = FramePredictor(
        module, window, args.overlap, args.batch_size, args.sigma, args.mode, args.precision, tta=args.tta
    )
    overlays = Path(args.overlays) if args.overlays else (out if src.is_dir() else None)
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
    start, pixels, n = time.perf_counter(), 0, 0

    def run(depth: np.ndarray, valid: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        nonlocal pixels
        prob = predictor(torch.from_numpy(depth), torch.from_numpy(valid)).numpy()
        mask = post.apply((prob >= threshold) & valid, valid).astype(np.uint8)
        if overlays is not None:
            Image.fromarray(overlay(depth, valid, mask)).save(overlays / f"{name}_overlay.png")
        pixels += prob.size
        return prob, mask

    if src.is_dir():
        n, frames = _folder_frames(src, float(args.scale or 1.0))
        out.mkdir(parents=True, exist_ok=True)
        for name, depth, valid in tqdm(frames, total=n, desc=f"predict {src.name}", unit="frame", disable=n < 2):
            _, mask = run(depth, valid, name)
            Image.fromarray(mask * 255).save(out / f"{name}_mask.png")
        size = depth.shape
    else:
        with atomic_output(out) as tmp, h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
            frames = _frames(f, str(src), args.key)
            n, size = frames.shape[0], frames.shape[-2:]
            scale = float(args.scale if args.scale is not None else frames.attrs.get("scale", 1.0))
            valid_ds = f[args.valid_key] if args.valid_key else None
            prob_ds = g.create_dataset("prob", (n, *size), "float16", chunks=(1, *size))
            mask_ds = g.create_dataset("mask", (n, *size), "uint8", chunks=(1, *size))
            for i in tqdm(range(n), desc=f"predict {src.name}", unit="frame", disable=n < 2):
                stored = frames[i].reshape(size)
                depth, valid = depth_and_validity(stored, scale, valid_ds[i] if valid_ds is not None else None)
                prob, mask_ds[i] = run(depth, valid, f"frame{i:05d}")
                prob_ds[i] = prob.astype(np.float16)
            attrs = {"checkpoint": str(args.ckpt_path), "threshold": threshold, "window": window, **post.as_dict()}
            g.attrs.update({**attrs, "overlap": args.overlap, "mode": args.mode})
    seconds = time.perf_counter() - start
    return {
        "output": str(out),
        "frames": n,
        "size": tuple(size),
        "threshold": threshold,
        "megapixels_per_s": pixels / 1e6 / max(seconds, 1e-9),
        "window": window,
        "mode": args.mode,
        "postprocess": post.as_dict(),
        "overlays": str(overlays) if overlays else None,
    }


@hydra_app("predict")
def main(cfg: DictConfig) -> None:
    """glint-predict: glint probabilities and masks for full depth frames of any size."""
    r = predict_file(cfg)
    what = "PNG masks and overlays" if Path(r["output"]).is_dir() else "prob (float16) and mask (uint8)"
    post = PostProcess.from_dict(r["postprocess"])
    post_text = f", post-processing {post.describe()}" if post.active else ""
    print(
        f"wrote {r['output']}: {what} for {r['frames']} frame(s) of {r['size'][0]}x"
        f"{r['size'][1]}; threshold {r['threshold']}{post_text}, {r['mode']} mode, window {r['window'][0]}x"
        f"{r['window'][1]}, {r['megapixels_per_s']:.2f} megapixels/s"
    )


if __name__ == "__main__":
    main()
