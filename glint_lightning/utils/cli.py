"""Every entry point is a Hydra app over a primary config in conf/: `--help`, `--cfg job`, `key=value`, `-m`.

`hydra_app` adds what each of them needs on top of `hydra.main`: our one-line user errors (exit 2), also when Hydra
wrapped them, and Hydra's own composition errors (a typo'd key, an unknown option) condensed into one line.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from glint_lightning.utils.config_dir import CONFIG_DIR
from glint_lightning.utils.errors import EXIT_USER_ERROR, exit_on_user_error
from glint_lightning.utils.tool_help import register_help_resolver
from glint_lightning.utils.trust import trust


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorate `task(cfg)`; the result is the console script (`main()`, arguments from sys.argv)."""

    register_help_resolver()

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
        def app(cfg: DictConfig) -> Any:  # launchers (joblib, submitit) pickle this: it holds no open stream
            _release_stderr()
            in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            with exit_on_user_error(in_sweep=in_sweep):
                trust(cfg.get("trusted_targets"))
                return task(cfg)

        def main() -> Any:
            held = _HeldBack(sys.stderr)
            real, sys.stderr = sys.stderr, held
            try:
                return app()
            except SystemExit as exit_:
                if held.held and exit_.code not in (0, None):  # Hydra refused the command line itself
                    line = _one_line(held.discard())
                    print(line if line.startswith("error:") else f"error: {line}", file=real, flush=True)
                    raise SystemExit(EXIT_USER_ERROR) from None
                raise
            finally:
                sys.stderr = real
                held.release()

        main.__doc__ = task.__doc__
        main.task = task  # type: ignore[attr-defined]
        return main

    return decorate


def _release_stderr() -> None:
    """The task has started: pass on what Hydra wrote while composing, and give the task the real stream."""
    if isinstance(sys.stderr, _HeldBack):
        held = sys.stderr
        held.release()
        sys.stderr = held.real


class _HeldBack(io.TextIOBase):
    """stderr that holds what is written until the task starts (then passes everything through)."""

    def __init__(self, real: Any) -> None:
        self.real, self.buffer_, self.held = real, io.StringIO(), True

    def write(self, s: str) -> int:
        return (self.buffer_ if self.held else self.real).write(s)

    def flush(self) -> None:
        self.real.flush()

    def discard(self) -> str:
        """Stop holding and return what was held, without passing it on."""
        text, self.held = self.buffer_.getvalue(), False
        return text

    def release(self) -> None:
        if self.held:
            self.held = False
            self.real.write(self.buffer_.getvalue())
            self.buffer_ = io.StringIO()


def _one_line(text: str) -> str:
    """Hydra's multi-line message as one line, without its HYDRA_FULL_ERROR hint."""
    text = text.split("Config search path:")[0]
    noise = ("full_key:", "object_type=", "reference_type=", "Set the environment variable HYDRA_FULL_ERROR")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
    return " ".join(lines) if lines else "invalid command line (HYDRA_FULL_ERROR=1 for details)"
