"""An Optuna study's storage, pruner and the names the sweeper, its pruning callback and glint-report share.

`hydra.sweeper.storage` is a path or a URL (`storage_url`): SQLite for `.db`, a journal file for other paths (shared
file systems without a database), any Optuna URL as is. Pruners are named (`median` = optuna.pruners.MedianPruner)
rather than given by `_target_`: a trial's config is stored in its checkpoints, and what they store must build only
trusted code. Optuna is imported only when a storage or pruner is made: importing this needs no `sweep` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from glint_lightning.utils.errors import GlintError

if TYPE_CHECKING:
    import optuna

STUDY_POINTER = "optuna_study.yaml"  # in each sweep folder of a study: its storage and name (glint-report reads it)
PRUNING_OVERRIDE = "+callbacks.optuna_pruning."  # the overrides that wire this callback into a trial
PRUNED_ATTR = "pruned_at_epoch"  # trial user attribute and metrics.json key: the epoch at which the pruner stopped
# Defaults where Optuna's do not fit whole trainings: the median pruner waits for 5 finished trials, and judges a
# trial from its second validation on (one epoch says little about a learning rate).
PRUNER_DEFAULTS: dict[str, dict[str, Any]] = {"median": {"n_startup_trials": 5, "n_warmup_steps": 1}}


def storage_url(spec: str) -> str:
    """`hydra.sweeper.storage` as Optuna understands it: a URL as is; a `.db`/`.sqlite` path as SQLite; any other
    path is a journal file (JournalFileBackend, for shared file systems without a database)."""
    if "://" in spec:
        return spec
    path = Path(spec).expanduser().absolute()
    return f"sqlite:///{path}" if path.suffix in (".db", ".sqlite", ".sqlite3") else str(path)


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """The storage `spec` names (see `storage_url`), its folder made; SQLite waits up to a minute for a lock that
    another launch or trial holds, instead of failing at once."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = storage_url(spec)
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        if "://" in url:
            return optuna.storages.RDBStorage(url)
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except (OSError, ImportError, ValueError) as err:
        raise GlintError(
            f"hydra.sweeper.storage={spec}: cannot open it ({type(err).__name__}: {str(err).splitlines()[0]}); pass a "
            "writable .db file, a journal file, or an Optuna storage URL"
        ) from None


def make_pruner(name: str | None, args: dict[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """optuna.pruners.<Name>Pruner (`successive_halving` -> SuccessiveHalvingPruner) with `args` over our
    defaults; `none` (or null) never prunes."""
    import optuna

    if name in (None, "none", "null"):
        return optuna.pruners.NopPruner()
    cls = getattr(optuna.pruners, "".join(p.capitalize() for p in str(name).split("_")) + "Pruner", None)
    if cls is None:
        raise GlintError(f"hydra.sweeper.pruner={name}: no such Optuna pruner; use none, median, hyperband, threshold")
    return cls(**{**PRUNER_DEFAULTS.get(str(name), {}), **(args or {})})
