"""`python -m glint_lightning.data.check tiles.h5 [--depth-key depth --mask-key mask --valid-key valid]`

Validates a tile file without loading it whole: keys, shapes, dtypes, mask values, NaN/inf, empty or entirely
invalid tiles, the share of tiles with glints, chunking. Each problem is one line naming the key and the tile
indices; exit code 2 when the file cannot be trained on, 0 otherwise (warnings included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

from glint_lightning.data.h5 import DEPTH_DTYPES, MASK_CHECK_BLOCK
from glint_lightning.utils.errors import EXIT_USER_ERROR, ArgumentParser


def index_ranges(indices: list[int], limit: int = 6) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10' (first `limit` ranges, then how many more tiles)."""
    ranges: list[list[int]] = []
    for i in indices:
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges[:limit])
    more = sum(b - a + 1 for a, b in ranges[limit:])
    return text + (f" and {more} more" if more else "")


def check_file(path: str | Path, depth_key: str = "depth", mask_key: str = "mask", valid_key: str = "valid"):
    """(summary lines, errors, warnings) for one tile file."""
    path = Path(path)
    if not path.is_file():
        return [], ["no such file; pass the path of an HDF5 tile file"], []
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        return [], [f"not an HDF5 file ({err})"], []
    errors, warnings, summary = [], [], []
    with f:
        missing = [(role, k) for role, k in (("depth", depth_key), ("mask", mask_key)) if k not in f]
        if missing:
            return [], [f"'{k}': missing (found {sorted(f.keys())}); pass --{role}-key" for role, k in missing], []
        depth, mask = f[depth_key], f[mask_key]
        valid = f.get(valid_key)
        if not (depth.ndim == 3 or (depth.ndim == 4 and depth.shape[1] == 1)):
            return [], [f"'{depth_key}': shape {depth.shape}; expected (N, H, W) or (N, 1, H, W)"], []
        n, h, w = depth.shape[0], depth.shape[-2], depth.shape[-1]
        if depth.dtype.type not in DEPTH_DTYPES:
            errors.append(f"'{depth_key}': dtype {depth.dtype}; expected float32, float16 or uint16")
        if tuple(mask.shape) != (n, h, w):
            errors.append(f"'{mask_key}': shape {mask.shape}; expected {(n, h, w)} like '{depth_key}'")
        if valid is not None and tuple(valid.shape) != (n, h, w):
            errors.append(f"'{valid_key}': shape {valid.shape}; expected {(n, h, w)}")
        if n == 0:
            errors.append(f"'{depth_key}': no tiles")
        if errors:
            return summary, errors, warnings
        chunks = depth.chunks
        if chunks is None or chunks[0] != 1 or tuple(chunks[-2:]) != (h, w):
            warnings.append(
                f"'{depth_key}': chunks {chunks}; one tile per chunk reads fastest (data.convert writes it)"
            )
        bad_mask, non_finite, empty, with_glint = [], [], [], []
        glint_pixels = valid_pixels = 0
        for start in range(0, n, MASK_CHECK_BLOCK):
            d = depth[start : start + MASK_CHECK_BLOCK].reshape(-1, h, w).astype(np.float32)
            m = mask[start : start + MASK_CHECK_BLOCK]
            finite = np.isfinite(d)
            v = finite & (valid[start : start + MASK_CHECK_BLOCK].astype(bool) if valid is not None else d != 0)
            for j in range(len(d)):
                i = start + j
                if ((m[j] != 0) & (m[j] != 1)).any():
                    bad_mask.append(i)
                if not finite[j].all():
                    non_finite.append(i)
                if not v[j].any():
                    empty.append(i)
                if (m[j] == 1).any():
                    with_glint.append(i)
            glint_pixels += int(((m == 1) & v).sum())
            valid_pixels += int(v.sum())
        if bad_mask:
            values = np.unique(mask[bad_mask[0]])
            errors.append(f"'{mask_key}' tiles {index_ranges(bad_mask)}: values {values.tolist()[:5]} outside {{0, 1}}")
        if empty:
            (errors if len(empty) == n else warnings).append(
                f"'{depth_key}' tiles {index_ranges(empty)}: no valid pixel (all 0, NaN or inf"
                + (f" or not in '{valid_key}'" if valid is not None else "")
                + "); they add nothing to training"
            )
        if non_finite:
            warnings.append(f"'{depth_key}' tiles {index_ranges(non_finite)}: NaN or inf values (scored as invalid)")
        if not with_glint:
            warnings.append(f"'{mask_key}': no tile has a glint")
        valid_text = "present" if valid is not None else "absent (depth 0/NaN invalid)"
        summary = [
            f"{path}: {n} tiles of {h}x{w}; '{depth_key}' {depth.dtype} (scale {depth.attrs.get('scale', 1.0)} mm), "
            f"'{mask_key}' {mask.dtype}, '{valid_key}' {valid_text}",
            f"glints: {len(with_glint)} tiles ({100 * len(with_glint) / n:.1f} %) have glints; "
            f"{100 * glint_pixels / max(valid_pixels, 1):.2f} % of valid pixels are glint",
        ]
    return summary, errors, warnings


def main(argv: list[str] | None = None) -> int:
    """glint-check: the report and its exit code (the console script exits with what this returns)."""
    parser = ArgumentParser(prog="glint-check", description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--depth-key", default="depth")
    parser.add_argument("--mask-key", default="mask")
    parser.add_argument("--valid-key", default="valid")
    args = parser.parse_args(argv)
    summary, errors, warnings = check_file(args.path, args.depth_key, args.mask_key, args.valid_key)
    if not summary:  # not readable as tiles at all (no file, not HDF5, no such key): the problem is the whole answer
        for line in errors:
            print(f"error: {args.path}: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\n".join(summary))
    for line in warnings:
        print(f"warning: {line}")
    for line in errors:
        print(f"error: {args.path}: {line}", file=sys.stderr)
    print(f"{'FAILED' if errors else 'OK'}: {len(errors)} error(s), {len(warnings)} warning(s)")
    return EXIT_USER_ERROR if errors else 0


if __name__ == "__main__":
    sys.exit(main())
