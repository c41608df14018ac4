"""What a run was made from, written beside its results: code version, command, overrides, data files."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning
import torch

from glint_lightning.data.sources import file_fingerprint

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def git_state(folder: Path = PACKAGE_DIR) -> dict[str, Any] | None:
    """Commit and dirtiness of the git checkout holding the code, or None outside one."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return None


def package_version() -> str:
    try:
        return version("glint-lightning")
    except PackageNotFoundError:
        return "unknown"


def provenance(overrides: list[str], data_files: dict[str, str]) -> dict[str, Any]:
    """Plain data for `provenance.json` (the composed config is Hydra's `.hydra/config.yaml`)."""
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, "-m", "glint_lightning.train", *sys.argv[1:]],
        "overrides": overrides,
        "glint_lightning": package_version(),
        "git": git_state(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "lightning": lightning.__version__},
        "host": socket.gethostname(),
        "data": {
            split: {"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size, "fingerprint": file_fingerprint(p)}
            for split, p in data_files.items()
        },
    }
