"""Which files a split reads (a path, a list or a glob), whether they can be read as one, the split unit of each
tile (its frame, its file, or itself), and a cheap fingerprint of a file's content (provenance, data.json, plans)."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from glint_lightning.data.h5 import TileFileInfo, TileKeys, inspect_tile_file, read_frames
from glint_lightning.utils.errors import GlintError

GLOB_CHARS = frozenset("*?[")
SPLIT_UNITS = ("file", "frame", "tile")
UNIT_NAMES = {"file": "files", "frame": "frames", "tile": "tiles"}


def resolve_paths(value: str | os.PathLike | Sequence[str | os.PathLike], option: str) -> list[str]:
    """Files of `value`: a path, a glob (sorted by path) or a list of either, in the order given."""
    items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not items:
        raise GlintError(f"{option}=[]: the list is empty; give at least one file")
    paths: list[str] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if GLOB_CHARS & set(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise GlintError(f"{option}: the pattern '{item}' matches no file; check the folder and the pattern")
            paths += found
        else:
            paths.append(text)
    seen: set[str] = set()
    for p in paths:
        key = str(Path(p).resolve())
        if key in seen:
            raise GlintError(f"{option}: {p} is listed twice; list each file once (its tiles would count twice)")
        seen.add(key)
    return paths


def inspect_files(paths: Sequence[str], keys: TileKeys, depth_scale: float | None, option: str) -> list[TileFileInfo]:
    """Inspect each file and refuse a set whose tile size, dtypes or keys disagree, naming both files."""
    infos = [inspect_tile_file(p, keys, depth_scale) for p in paths]
    first = infos[0]

    def layout(info: TileFileInfo) -> dict[str, object]:
        return {
            "tile size": (info.height, info.width),
            f"'{keys.depth}' dtype": info.depth_dtype,
            f"'{keys.mask}' dtype": info.mask_dtype,
            f"'{keys.valid}' dataset": "present" if info.has_valid else "absent",
            f"'{keys.valid}' dtype": info.valid_dtype,
        }

    want = layout(first)
    for info in infos[1:]:
        for what, value in layout(info).items():
            if value != want[what]:
                raise GlintError(
                    f"{info.path}: {what} {value} differs from {first.path} ({want[what]}); all files of {option} "
                    "must have the same tile size, dtypes and keys"
                )
    return infos


def choose_split_by(split_by: str | None, infos: Sequence[TileFileInfo], keys: TileKeys) -> tuple[str, str | None]:
    """(unit, note): `split_by`, or for None frame when every file records it, else tile with a note why."""
    if split_by not in (None, *SPLIT_UNITS):
        raise GlintError(f"data.split_by={split_by}; use file, frame, tile or null (frame when the files record it)")
    missing = next((info.path for info in infos if not info.has_frame), None)
    if split_by == "frame" and missing:
        raise GlintError(
            f"{missing}: no per-tile frame ids ('{keys.frame}'); data.split_by=frame needs them in every training "
            "file (set data.keys.frame to their dataset) or use data.split_by=file|tile"
        )
    if split_by is not None:
        return split_by, None
    if missing is None:
        return "frame", None
    note = (
        f"{missing} records no frame ids ('{keys.frame}'): held-out tiles are drawn one by one, so tiles of one "
        "frame can land in both train and val; record them (glint-convert does) or set data.split_by=file"
    )
    return "tile", note


def tile_units(infos: Sequence[TileFileInfo], keys: TileKeys, split_by: str) -> np.ndarray:
    """The split unit of every tile of the concatenated files: its frame id, its file's position, or its index.

    Frame ids are taken as they are stored, across files: equal ids in two files count as one frame, so a
    recording cut into several files (with global frame numbers) never has a frame on both sides of a split.
    """
    if split_by == "frame":
        return np.concatenate([read_frames(info, keys) for info in infos])
    if split_by == "file":
        return np.repeat(np.arange(len(infos), dtype=np.int64), [info.n for info in infos])
    return np.arange(sum(info.n for info in infos), dtype=np.int64)


def file_fingerprint(path: str | Path, blocks: int = 16, block_size: int = 1 << 20) -> str:
    """sha256 of the file's size and `blocks` evenly spaced 1 MiB blocks (all of a file up to 16 MiB): cheap on a
    100 GB file, and any rewrite, truncation or append that touches a sampled block changes it."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= blocks * block_size:
            digest.update(f.read())
        else:
            for i in range(blocks):
                f.seek((size - block_size) * i // (blocks - 1))
                digest.update(f.read(block_size))
    return f"sha256-sampled:{digest.hexdigest()}"
