"""User errors: one line that names the file, key or option and the fix, then a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2


class GlintError(Exception):
    """A problem with the user's input (file, key, option) rather than a bug in the framework."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a GlintError into `error: <message>` on stderr and exit code 2 (full traceback with HYDRA_FULL_ERROR=1)."""
    try:
        yield
    except GlintError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
