"""Which `_target_`s may be built. `weights_only=True` stops unpickling, not what `instantiate()` calls afterwards
from a stored config: every `_target_` from a checkpoint, an exported file or a user's config must lie under a
trusted prefix before anything is built from it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from glint_lightning.utils.errors import GlintError

TRUSTED = ("glint_lightning.", "torch.nn.", "torch.optim.", "segmentation_models_pytorch.")
# Lightning's classes are built only from train's composed config, and only in these top-level groups.
LIGHTNING = "lightning.pytorch."
LIGHTNING_GROUPS = ("trainer", "callbacks", "logger")
ENV_VAR = "GLINT_TRUSTED_TARGETS"  # extra prefixes, comma-separated (for entry points that take no config)
_configured: tuple[str, ...] = ()


def trust(prefixes: Iterable[str] | None) -> None:
    """Add the user's `trusted_targets` (e.g. ["mylab."]) for this process; entry points call it first."""
    global _configured
    _configured = tuple(dict.fromkeys((*_configured, *(str(p) for p in prefixes or ()))))


def trusted_prefixes() -> tuple[str, ...]:
    env = tuple(p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip())
    return (*TRUSTED, *_configured, *env)


def _targets(tree: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every `_target_` in a nested config of dicts and lists."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            child = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield child, v
            else:
                yield from _targets(v, child)
    elif isinstance(tree, Sequence) and not isinstance(tree, str | bytes):
        for i, v in enumerate(tree):
            yield from _targets(v, f"{key}[{i}]")


def untrusted_targets(tree: Any, lightning_under: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(key, target) of each `_target_` outside the trusted prefixes; `lightning.pytorch.` is trusted only under
    the top-level keys `lightning_under`."""
    prefixes = trusted_prefixes()
    bad = []
    for key, target in _targets(tree):
        allowed = prefixes + ((LIGHTNING,) if key.split(".")[0].split("[")[0] in lightning_under else ())
        if not isinstance(target, str) or not target.startswith(allowed):
            bad.append((key, str(target)))
    return bad


def check_targets(tree: Any, source: str, lightning_under: Sequence[str] = (), prefix: str = "") -> None:
    """Refuse, with one line naming `source`, the key and the target, a config that would build untrusted code."""
    bad = untrusted_targets(tree, lightning_under)
    if bad:
        key, target = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UntrustedTarget(
            f"{source}: {prefix}{key}={target} is not a trusted target{more}; nothing was built. If you trust it, "
            f"add its package with trusted_targets=[{_package(target)}] (or {ENV_VAR}={_package(target)})"
        )


def _package(target: str) -> str:
    return target.split(".")[0] + "." if "." in target else target


class UntrustedTarget(GlintError):
    """A stored or user config names a callable outside the trusted prefixes."""


def check_stored_config(obj: Mapping[str, Any], source: str) -> None:
    """Every `_target_` a checkpoint (`hyper_parameters`, with the run's whole config under `config`) or an exported
    file (`model_config`, `train_args`) stores, whether or not the caller would build that part."""
    hparams = obj.get("hyper_parameters") or {}
    if isinstance(hparams, Mapping):
        check_targets({k: v for k, v in hparams.items() if k != "config"}, source, prefix="hyper_parameters.")
        check_targets(hparams.get("config") or {}, source, LIGHTNING_GROUPS, prefix="hyper_parameters.config.")
    check_targets(obj.get("model_config") or {}, source, prefix="model_config.")
    check_targets(obj.get("train_args") or {}, source, LIGHTNING_GROUPS, prefix="train_args.")
