"""Optuna sweeps (`hydra/sweeper=glint_optuna`, used by `hparams_search=optuna`): ask a batch of trials, launch
them through the configured launcher (basic, joblib, submitit), tell their results.

The study lives in Optuna's own storage (`open_storage`: SQLite by default, any Optuna URL, or a journal file), so
Optuna's tools open it (optuna-dashboard, the `optuna` CLI, `optuna.load_study`) and relaunching the same command
continues it. Around that, what a sweep of long trainings needs:
- Owners. Each launch records itself in the study (user attr `glint_launch:<id>`: host, pid, a heartbeat refreshed
  every `HEARTBEAT_S`) and each trial it asks records that launch (`glint_launch`). A launch only fails RUNNING
  trials whose owner is dead (same host and its pid gone, or a heartbeat older than `heartbeat_grace_s`), so N
  launches (shells, SLURM jobs) share one study. Optuna's own heartbeat works only under `study.optimize`.
- Cut-short trials. A trial whose launch died, or whose job was interrupted (a signal: a kill, a pre-emption), is
  not the trial's fault: it is marked FAIL with `glint_cut_short`, its parameters are enqueued to run again (as
  Optuna's RetryFailedTrialCallback does), and it does not count toward `n_trials`. A trial that failed by itself
  (diverged, out of memory, a bad option) counts.
- Counting. `n_trials` is the study's total over all launches: finished trials (bar cut-short ones) plus RUNNING
  ones; each launch asks at most what is missing, under a lock for file storages, so together they stop there.
- Pruning: `pruner` adds glint_lightning.callbacks.OptunaPruning to each trial; a trial it stopped is told PRUNED.
- Reporting: each trial records its sweep folder and job number, and each sweep folder names its study
  (`optuna_study.yaml`), so `glint-report dir=<any sweep folder of the study>` covers every trial.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from glint_lightning.utils.errors import GlintError, Interrupted, exit_on_user_error
from glint_lightning.utils.optuna_storage import (
    PRUNED_ATTR,
    PRUNING_OVERRIDE,
    STUDY_POINTER,
    make_pruner,
    open_storage,
    storage_url,
)

log = logging.getLogger(__name__)

LAUNCH_ATTR, CUT_SHORT_ATTR = "glint_launch", "glint_cut_short"
SWEEP_DIR_ATTR, JOB_NUM_ATTR, FIXED_ATTR = "hydra_sweep_dir", "hydra_job_num", "fixed_overrides"
HEARTBEAT_S = 30.0


def search_space(overrides: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Hydra sweep overrides (`key=tag(log, interval(1e-4, 1e-2))`, `choice(a, b)`, `a,b`, `range(1, 9, 2)`) as
    Optuna distributions by key; the other overrides are passed to every trial as they are. Later ones win."""
    parsed: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        parsed[override.get_key_element()] = override
    space, fixed = {}, []
    for key, override in parsed.items():
        if override.is_sweep_override():
            space[key] = distribution(key, override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def distribution(key: str, override: Override) -> BaseDistribution:
    """One sweep override as an Optuna distribution (tags: `log`, `int`)."""
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(sweep.list)
    log_scale = "log" in getattr(sweep, "tags", ())
    if isinstance(sweep, RangeSweep):
        step = sweep.step
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, step)) and step > 0 and not log_scale:
            values = range(sweep.start, sweep.stop, step)  # stop excluded, as in Python
            return IntDistribution(values[0], values[-1], step=step)
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, IntervalSweep):
        if "int" in sweep.tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise GlintError(
        f"{key}={override.input_line.split('=', 1)[1]}: Optuna cannot sample it; use choice(...), "
        "range(...) or interval(...)"
    )


def override_value(value: Any) -> str:
    """A sampled value as Hydra override text (strings quoted when they hold grammar characters)."""
    if isinstance(value, str) and any(c in value for c in " ,:=[]{}()'\"\\$"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _alive(owner: dict[str, Any], grace_s: float) -> bool:
    """A launch is alive while its heartbeat is recent and, on this host, its process exists."""
    if time.time() - float(owner.get("beat", 0)) > grace_s:
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class StudySweep:
    """The sweep of one launch over a shared, persistent study (see the module's docstring)."""

    def __init__(
        self,
        *,
        study_name: str,
        storage: str | None,
        direction: str | list[str] = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        pruner: str | None = None,
        pruner_args: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        heartbeat_grace_s: float = 300.0,
    ) -> None:
        self.study_name, self.storage_spec = study_name, storage
        self.directions = [str(d).lower() for d in ([direction] if isinstance(direction, str) else direction)]
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.sampler, self.pruner = sampler, pruner
        self.pruner_args = dict(pruner_args or {})
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.heartbeat_grace_s = float(heartbeat_grace_s)
        self.launch_id = uuid.uuid4().hex[:12]
        self.storage: optuna.storages.BaseStorage | None = None
        self.study_id = -1
        self.launcher: Launcher | None = None
        self.config: DictConfig | None = None
        self.sweep_dir: Path | None = None
        self._stop = threading.Event()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()

    # --- the study -----------------------------------------------------------------------------------------------

    def open_study(self) -> optuna.Study:
        """Create or load the study; refuse one started with another direction."""
        if not self.study_name:
            raise GlintError("hydra.sweeper.study_name is null: a study needs a name")
        if self.pruner not in (None, "none", "null") and not self.storage_spec:
            raise GlintError(
                f"hydra.sweeper.pruner={self.pruner} needs a study the trials can reach: set hydra.sweeper.storage"
            )
        self.storage = open_storage(self.storage_spec) if self.storage_spec else optuna.storages.InMemoryStorage()
        sampler = self.sampler
        if isinstance(sampler, dict | DictConfig):
            sampler = instantiate(sampler)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=sampler,
            pruner=make_pruner(self.pruner, self.pruner_args),
            directions=self.directions,
            load_if_exists=True,
        )
        self.study_id = self.storage.get_study_id_from_name(self.study_name)
        stored = [d.name.lower() for d in study.directions]
        if stored != self.directions:
            raise GlintError(
                f"hydra.sweeper.storage={self.storage_spec}: study {self.study_name} was started with direction "
                f"{stored}, not {self.directions}; keep its direction or pass hydra.sweeper.study_name=<new name>"
            )
        if study.get_trials(deepcopy=False) or self._launches(study):  # a seeded sampler would repeat its draws
            study.sampler.reseed_rng()
        return study

    def _launches(self, study: optuna.Study) -> dict[str, dict[str, Any]]:
        """Every launch of the study by id: host, pid and last heartbeat (study user attrs, seen by the dashboard)."""
        prefix = f"{LAUNCH_ATTR}:"
        return {k.removeprefix(prefix): v for k, v in study.user_attrs.items() if k.startswith(prefix)}

    def beat(self, study: optuna.Study) -> None:
        """Record (or refresh) this launch as alive."""
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        study.set_user_attr(f"{LAUNCH_ATTR}:{self.launch_id}", owner)

    @contextmanager
    def heartbeat(self, study: optuna.Study) -> Iterator[None]:
        """Refresh this launch's heartbeat in a thread while the sweep runs."""
        self.beat(study)

        def run() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.beat(study)
                except Exception as err:  # a storage hiccup: the next beat tries again
                    log.warning(f"Optuna heartbeat not recorded: {err}")

        thread = threading.Thread(target=run, name="glint-optuna-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def trial_id(self, number: int) -> int:
        """The storage's id of trial `number` (to set attributes of a trial this launch holds no Trial object of)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def cut_short(self, study: optuna.Study, trial: FrozenTrial | optuna.trial.Trial, why: str) -> None:
        """Fail a trial that was not at fault and enqueue its parameters again; it does not count."""
        self.storage.set_trial_user_attr(self.trial_id(trial.number), CUT_SHORT_ATTR, True)
        study.enqueue_trial(trial.params, user_attrs={"glint_retry_of": trial.number})
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        log.warning(f"Trial {trial.number} {why}: marked failed, its parameters run again")

    def reap(self, study: optuna.Study) -> None:
        """Fail (and enqueue again) the RUNNING trials whose launch is dead."""
        launches = self._launches(study)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            launch = trial.user_attrs.get(LAUNCH_ATTR, "")
            if launch != self.launch_id and not _alive(launches.get(launch, {}), self.heartbeat_grace_s):
                self.cut_short(study, trial, "was left running by a launch that stopped")

    def counted(self, study: optuna.Study) -> int:
        """Trials toward n_trials: finished ones that were not cut short, and RUNNING ones."""
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() and not t.user_attrs.get(CUT_SHORT_ATTR) for t in trials)
        return finished + sum(t.state == TrialState.RUNNING for t in trials)

    @contextmanager
    def ask_lock(self) -> Iterator[None]:
        """A lock across launches around counting and asking, for file storages (a server database has none: there
        two launches asking at the same moment may run up to n_jobs - 1 trials more than n_trials)."""
        url = storage_url(self.storage_spec) if self.storage_spec else ""
        path = url.removeprefix("sqlite:///")
        if not path or "://" in path:
            yield
            return
        lock = JournalFileOpenLock(path + ".asklock")  # a lock file made with O_EXCL: NFS too; a stale one expires
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # --- the sweep -----------------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        """Run batches of trials until the study holds n_trials (over all launches); `arguments` are the command
        line's overrides: its sweeps join the search space, the rest go to every trial."""
        assert self.launcher is not None and self.config is not None and self.sweep_dir is not None
        with exit_on_user_error():  # one line and exit 2 (Hydra would print a traceback)
            space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
            study = self.open_study()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        metric = self.config.get("optimized_metric")
        storage = storage_url(self.storage_spec) if self.storage_spec else None  # absolute: report from anywhere
        pointer = {"storage": storage, "study_name": self.study_name, "optimized_metric": metric}
        (self.sweep_dir / STUDY_POINTER).write_text(yaml.safe_dump(pointer, sort_keys=False))
        with self.heartbeat(study):
            with self.ask_lock():
                self.reap(study)
            done = self.counted(study)
            log.info(
                f"Study {self.study_name} in {self.storage_spec or 'memory'}: {done} trials done or running; "
                f"n_trials={self.n_trials} in total, so {max(0, self.n_trials - done)} to run"
                + ("" if done < self.n_trials else " (raise hydra.sweeper.n_trials, or pass a new study_name)")
            )
            while True:
                with self.ask_lock():
                    self.reap(study)
                    left = self.n_trials - self.counted(study)
                    trials = [study.ask(space) for _ in range(min(self.n_jobs, left))]
                    for trial in trials:
                        trial.set_user_attr(LAUNCH_ATTR, self.launch_id)
                if not trials:
                    break
                self.run_batch(study, trials, fixed)
        self.write_results(study)

    def trial_overrides(self, trial: optuna.trial.Trial, fixed: list[str]) -> list[str]:
        """The trial's command line: the fixed overrides, its parameters, the pruning callback's wiring."""
        overrides = [*fixed, *(f"{k}={override_value(v)}" for k, v in trial.params.items())]
        if self.pruner not in (None, "none", "null"):
            wiring = {
                "_target_": "glint_lightning.callbacks.optuna_pruning.OptunaPruning",
                "storage": override_value(storage_url(str(self.storage_spec))),
                "study_name": override_value(self.study_name),
                "trial": trial.number,
                "monitor": override_value(str(self.config.get("optimized_metric"))),
                "pruner": self.pruner,
            }
            wiring.update({f"pruner_args.{k}": override_value(v) for k, v in self.pruner_args.items()})
            overrides += [f"{PRUNING_OVERRIDE}{k}={v}" for k, v in wiring.items()]
        return overrides

    def run_batch(self, study: optuna.Study, trials: list[optuna.trial.Trial], fixed: list[str]) -> None:
        """Launch the trials as jobs (numbered from the first trial's number) and tell their results."""
        first = trials[0].number
        for i, trial in enumerate(trials):
            trial.set_user_attr(SWEEP_DIR_ATTR, str(self.sweep_dir))
            trial.set_user_attr(JOB_NUM_ATTR, first + i)
            trial.set_user_attr(FIXED_ATTR, fixed)
        log.info("Trials " + ", ".join(f"{t.number}: {t.params}" for t in trials))
        overrides = [self.trial_overrides(t, fixed) for t in trials]
        try:
            if type(self.launcher).__name__ == "BasicLauncher":  # in this process, one job after the other
                returns = [self.launch_here(o, first + i) for i, o in enumerate(overrides)]
            else:
                returns = self.launcher.launch(overrides, initial_job_idx=first)
        except BaseException:  # the launch itself is stopped (Ctrl-C, SIGTERM): not the trials' fault
            for trial in trials:
                self.cut_short(study, trial, "was interrupted with its launch")
            raise
        for trial, ret in zip(trials, returns, strict=True):
            self.tell(study, trial, ret)

    def launch_here(self, overrides: list[str], job_num: int) -> Any:
        """One job in this process, with sys.argv the job's own command line while it runs: Lightning's DDP starts
        the other ranks by running sys.argv again, which must train this trial, not start the sweep anew."""
        run_dir = f"hydra.run.dir={override_value(str(self.sweep_dir / str(job_num)))}"  # what Lightning passes on
        argv = sys.argv
        sys.argv = [argv[0], *overrides, "hydra.mode=RUN"]
        try:
            return self.launcher.launch([[*overrides, run_dir]], initial_job_idx=job_num)[0]
        finally:
            sys.argv = argv

    def tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: Any) -> None:
        """COMPLETE with the job's return value; PRUNED when its pruning callback stopped it; FAIL when it raised or
        returned no number (it counts); cut short when a signal interrupted it (it runs again)."""
        try:
            value = ret.return_value
        except (Interrupted, KeyboardInterrupt, SystemExit):
            self.cut_short(study, trial, "was interrupted")
            return
        except Exception as err:
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Trial {trial.number} failed: {type(err).__name__}: {str(err)[:300]}")
            return
        if PRUNED_ATTR in self.storage.get_trial(self.trial_id(trial.number)).user_attrs:
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"Trial {trial.number} was pruned")
        elif isinstance(value, int | float) and math.isfinite(value):
            study.tell(trial, float(value))
        else:
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Trial {trial.number} returned {value!r}, not a number: marked failed")

    def write_results(self, study: optuna.Study) -> None:
        """optimization_results.yaml in the sweep folder: the study's best so far (over all launches)."""
        results: dict[str, Any] = {"name": "optuna", "study_name": self.study_name}
        if len(self.directions) == 1:
            if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                best = study.best_trial
                results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
                log.info(f"Best trial {best.number}: {best.params}, value {best.value}")
        else:
            results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        (self.sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
