"""Callables with a visible effect, named by crafted `_target_`s: if any of them runs, a marker file appears."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_marker(*args: Any, **kwargs: Any) -> None:
    """What an attacker's payload would do: touch the file named by $GLINT_TEST_MARKER."""
    Path(os.environ.get("GLINT_TEST_MARKER", "marker")).write_text("payload ran")
