"""Optuna sweeps that survive a crash (`hydra/sweeper=glint_optuna`, used by `hparams_search=optuna`).

The study lives in a JSON file (`StudyFile`, one per study name, `outputs/optuna/<study_name>.json` by default)
rewritten after every change, so relaunching the same command continues it (`ResumableSweep`):
- trials that a killed launch left RUNNING are marked FAIL;
- `n_trials` counts the study's finished trials (complete, failed, pruned) over all launches: only the missing ones
  run, in a new sweep folder whose job folders are numbered by trial number;
- each trial records its sweep folder and job number (system attributes `hydra_sweep_dir`, `hydra_job_num`) and
  each sweep folder names its study file (`optuna_study.yaml`), so `glint-report` covers every trial of the study;
- the sampler is reseeded, or its random start-up draws would repeat the first launch's.
A launch locks the study file (`<file>.lock`, released when the process dies): a second launch of the same study
stops with one line instead of marking the first one's running trials failed.

Why not Optuna's SQLite storage: optuna 2.x, which hydra-optuna-sweeper pins, cannot write through SQLAlchemy 2,
which the mlflow extra needs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.storages import InMemoryStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from glint_lightning.report import STUDY_POINTER
from glint_lightning.utils.errors import GlintError, exit_on_user_error

log = logging.getLogger(__name__)
logging.getLogger("optuna.storages._in_memory").setLevel(logging.WARNING)  # "A new study created in memory"

FORMAT = "glint-optuna-study/1"
# InMemoryStorage's writes: each is followed by saving the whole file (a study is small; trials take minutes).
_WRITES = (
    "create_new_study",
    "delete_study",
    "set_study_directions",
    "set_study_user_attr",
    "set_study_system_attr",
    "create_new_trial",
    "set_trial_state",
    "set_trial_param",
    "set_trial_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
)


class StudyFile(InMemoryStorage):
    """Optuna's in-memory storage, loaded from `path` when it exists and saved to it (JSON, replaced atomically)
    after every write. Holds an exclusive lock on `<path>.lock` until `close()` or the end of the process."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path).absolute()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 (held)
        except OSError as err:
            raise GlintError(
                f"hydra.sweeper.storage={self.path}: cannot write there ({err.strerror}); pass a writable file"
            ) from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise GlintError(
                f"{self.path}: another launch is running this study; wait for it to end, or start another study "
                "with hydra.sweeper.study_name=<new name>"
            ) from None
        self._loading = True
        if self.path.is_file():
            self._load()
        self._loading = False

    def __str__(self) -> str:
        return str(self.path)

    def close(self) -> None:
        """Release the lock (a later StudyFile of the same path may then open it)."""
        self._lock_file.close()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            assert data["format"] == FORMAT, f"format {data['format']!r}, expected {FORMAT!r}"
            for study in data["studies"]:
                study_id = self.create_new_study(study["name"])
                self.set_study_directions(study_id, [StudyDirection[d] for d in study["directions"]])
                for key, value in study["user_attrs"].items():
                    self.set_study_user_attr(study_id, key, value)
                for key, value in study["system_attrs"].items():
                    self.set_study_system_attr(study_id, key, value)
                for trial in study["trials"]:
                    self.create_new_trial(study_id, template_trial=_frozen(trial))
        except (ValueError, KeyError, TypeError, AssertionError) as err:
            raise GlintError(
                f"{self.path}: not a study file of this framework ({type(err).__name__}: {err}); move it away or "
                "pass hydra.sweeper.study_name=<new name>"
            ) from None

    def _save(self) -> None:
        with self._lock:
            studies = []
            for summary in self.get_all_study_summaries():
                study_id = self.get_study_id_from_name(summary.study_name)
                studies.append(
                    {
                        "name": summary.study_name,
                        "directions": [d.name for d in self.get_study_directions(study_id)],
                        "user_attrs": self.get_study_user_attrs(study_id),
                        "system_attrs": self.get_study_system_attrs(study_id),
                        "trials": [_trial_json(t) for t in self.get_all_trials(study_id, deepcopy=False)],
                    }
                )
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "studies": studies}, indent=1, default=repr))
            os.replace(tmp, self.path)  # a reader (glint-report, a relaunch after a kill) sees a whole file


def _saving(name: str) -> Callable[..., Any]:
    write = getattr(InMemoryStorage, name)

    def method(self: StudyFile, *args: Any, **kwargs: Any) -> Any:
        result = write(self, *args, **kwargs)
        if not self._loading:
            self._save()
        return result

    method.__name__ = name
    return method


for _name in _WRITES:
    setattr(StudyFile, _name, _saving(_name))


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def _trial_json(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.params,
        "distributions": {k: json.loads(distribution_to_json(d)) for k, d in trial.distributions.items()},
        "user_attrs": trial.user_attrs,
        "system_attrs": trial.system_attrs,
        "intermediate_values": {str(step): v for step, v in trial.intermediate_values.items()},
        "datetime_start": _iso(trial.datetime_start),
        "datetime_complete": _iso(trial.datetime_complete),
    }


def _frozen(trial: dict[str, Any]) -> FrozenTrial:
    def when(key: str) -> datetime | None:
        return datetime.fromisoformat(trial[key]) if trial.get(key) else None

    return FrozenTrial(
        number=trial["number"],
        state=TrialState[trial["state"]],
        value=None,
        values=trial["values"],
        datetime_start=when("datetime_start"),
        datetime_complete=when("datetime_complete"),
        params=trial["params"],
        distributions={k: json_to_distribution(json.dumps(d)) for k, d in trial["distributions"].items()},
        user_attrs=trial["user_attrs"],
        system_attrs=trial["system_attrs"],
        intermediate_values={int(step): v for step, v in trial["intermediate_values"].items()},
        trial_id=-1,
    )


def check_database_url(url: str) -> None:
    """An Optuna database URL this environment can use: optuna 2.x writes nothing through SQLAlchemy 2."""
    if url.startswith("redis") or int(optuna.__version__.split(".")[0]) >= 3:
        return
    import sqlalchemy

    if int(sqlalchemy.__version__.split(".")[0]) >= 2:
        raise GlintError(
            f"hydra.sweeper.storage={url}: optuna {optuna.__version__} cannot use SQLAlchemy {sqlalchemy.__version__}"
            "; keep the study in a file instead, e.g. hydra.sweeper.storage=outputs/optuna/<study name>.json"
        )


class ResumableSweep(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweep over a study that outlives the launch (see the module's docstring)."""

    def sweep(self, arguments: list[str]) -> None:
        with exit_on_user_error():  # one line and exit 2 (Hydra would print a traceback)
            if isinstance(self.storage, str) and "://" not in self.storage:
                self.storage = self._resume(StudyFile(self.storage))
            elif isinstance(self.storage, str):
                check_database_url(self.storage)
        return super().sweep(arguments)

    def _resume(self, storage: StudyFile) -> StudyFile:
        """Mark the trials a dead launch left running failed; run only the trials missing from n_trials."""
        if not self.study_name:
            raise GlintError("hydra.sweeper.study_name is null: a study kept in a file needs a name")
        trials: list[FrozenTrial] = []
        try:
            study = optuna.load_study(study_name=self.study_name, storage=storage)
        except KeyError:  # a new study: the stock sweep creates it
            study = None
        if study is not None:
            stored, asked = [d.name.lower() for d in study.directions], [d.lower() for d in self._get_directions()]
            if stored != asked:
                raise GlintError(
                    f"{storage.path}: study {self.study_name} was started with direction {stored}, not {asked}; "
                    "keep its direction or start another study with hydra.sweeper.study_name=<new name>"
                )
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.tell(trial.number, state=TrialState.FAIL)
                log.warning(f"Trial {trial.number} was left running by a launch that stopped: marked failed")
            trials = study.get_trials(deepcopy=False)
            if hasattr(self.sampler, "reseed_rng"):
                self.sampler.reseed_rng()
        finished = sum(t.state.is_finished() for t in trials)
        self.job_idx = len(trials)  # job folders numbered by trial number, across launches
        log.info(
            f"Study {self.study_name} in {storage.path}: {finished} finished trials; n_trials={self.n_trials} in "
            f"total, so {max(0, self.n_trials - finished)} to run"
            + ("" if finished < self.n_trials else " (raise hydra.sweeper.n_trials, or pass a new study_name)")
        )
        self.n_trials = max(0, self.n_trials - finished)
        sweep_dir = Path(self.sweep_dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        pointer = {
            "storage": str(storage.path),
            "study_name": self.study_name,
            "optimized_metric": self.config.get("optimized_metric"),
        }
        (sweep_dir / STUDY_POINTER).write_text(yaml.safe_dump(pointer, sort_keys=False))
        return storage

    def _configure_trials(
        self, trials: list[Trial], search_space_distributions: dict[str, Any], fixed_params: dict[str, Any]
    ) -> Sequence[Sequence[str]]:
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        for i, trial in enumerate(trials):  # where glint-report finds the trial's run
            trial.set_system_attr("hydra_sweep_dir", str(Path(self.sweep_dir).absolute()))
            trial.set_system_attr("hydra_job_num", self.job_idx + i)
        return overrides
