"""User errors: one line that names the file, key or option and the fix, then a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_USER_ERROR = 2


class GlintError(Exception):
    """A problem with the user's input (file, key, option) rather than a bug in the framework."""

    prefix = "error"
    exit_code = EXIT_USER_ERROR


class Interrupted(GlintError):
    """The run was stopped by a signal after saving a resumable checkpoint; exits with 128 + the signal number."""

    prefix = "interrupted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class OptionError(GlintError, ValueError):
    """An option outside what a component accepts (`model.init=he`, an empty `loss.terms`): one line and exit 2,
    also from inside Hydra's instantiate, and still a ValueError for callers that catch that."""


class TrainingDiverged(GlintError):
    """The loss became NaN or infinite: with the config as given, training cannot go on."""


def user_error(err: BaseException) -> GlintError | None:
    """The GlintError behind `err`: itself, or the cause Hydra wrapped in an InstantiationException when one of our
    constructors raised it inside `instantiate()`."""
    while err is not None and not isinstance(err, GlintError):
        if type(err).__name__ != "InstantiationException":
            return None
        err = err.__cause__
    return err


@contextmanager
def exit_on_user_error(in_sweep: bool = False) -> Iterator[None]:
    """Turn a GlintError into `error: <message>` on stderr and exit code 2 (full traceback with HYDRA_FULL_ERROR=1).

    In a sweep job the error is re-raised after the line instead, so that Hydra records that job as failed and a
    sweeper such as Optuna goes on with the next trial; an interruption still stops the whole sweep.
    """
    try:
        yield
    except Exception as raised:
        err = user_error(raised)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{err.prefix}: {err}", file=sys.stderr, flush=True)
        if in_sweep and not isinstance(err, Interrupted):
            raise err from None
        raise SystemExit(err.exit_code) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the plain (non-Hydra) console scripts: a wrong command line is one line, like every other user
    error (argparse's own is the usage block, then the message)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
