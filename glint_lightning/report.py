"""`glint-report dir=outputs/multirun/<date>/<time> [metric=val/iou]`: one table for a sweep.

Reads every job's overrides (`.hydra/overrides.yaml`) and results (`metrics.json`: best and final metrics, epochs,
duration, checkpoints), and writes `report.md`, `report.csv` and `report.png` (the metric per job, best first) into
the sweep folder. Jobs without results (failed or still running) are listed as such, last.

A sweep folder of an Optuna study (`hparams_search=optuna`; the folder holds `optuna_study.yaml`, naming the study's
storage) is reported as the whole study, since a relaunch after a crash, or a second launch, runs its trials in
another sweep folder: one row per trial of the study (read with `optuna.load_study`: its state, parameters and
value), with the run data of its job folder wherever that is. Optuna is imported only for such a folder.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from glint_lightning.utils.cli import hydra_app
from glint_lightning.utils.errors import GlintError
from glint_lightning.utils.optuna_storage import PRUNING_OVERRIDE, STUDY_POINTER, open_storage, storage_url

TRIAL_STATUS = {"COMPLETE": "done", "FAIL": "failed", "RUNNING": "running", "PRUNED": "pruned", "WAITING": "waiting"}


def run_data(job: Path) -> dict[str, Any]:
    """A job folder's results from its metrics.json; {} when it has none (failed, unfinished, or gone)."""
    metrics_file = job / "metrics.json"
    if not metrics_file.is_file():
        return {}
    summary = json.loads(metrics_file.read_text())
    data = {"epochs": summary.get("epochs"), "duration_s": summary.get("duration_s")}
    data.update(optimized_metric=summary.get("optimized_metric"), best_score=summary.get("best_score"))
    data.update(summary.get("final", {}))
    data.update(summary.get("test", {}))
    data["best_checkpoint"] = summary.get("best_checkpoint")
    return data


def _overrides(job: Path) -> list[str] | None:
    file = job / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return None
    return [o for o in yaml.safe_load(file.read_text()) or [] if not o.startswith(PRUNING_OVERRIDE)]


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder (a folder with .hydra/overrides.yaml) under `sweep_dir`."""
    rows = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job = overrides_file.parent.parent
        data = run_data(job)
        status = "done" if data else "failed or unfinished"
        rows.append({"job": job.name, "overrides": _overrides(job), "status": status, **data})
    return rows


def study_rows(pointer: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]] | None:
    """One row per trial of the study `pointer` names, and the sweep folders of its launches; None when its
    storage is gone (a file storage whose file was removed)."""
    import optuna

    from glint_lightning.runs import optuna_sweep as sweep

    if not pointer.get("storage"):  # a study kept in memory: gone with its launch
        return None
    url = storage_url(str(pointer["storage"]))
    if "://" not in url.removeprefix("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=pointer["study_name"], storage=open_storage(str(pointer["storage"])))
    except KeyError:
        raise GlintError(f"{pointer['storage']}: no study named {pointer['study_name']}") from None
    rows, sweeps = [], []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        job = (
            Path(attrs[sweep.SWEEP_DIR_ATTR]) / str(attrs[sweep.JOB_NUM_ATTR])
            if sweep.SWEEP_DIR_ATTR in attrs
            else None
        )
        if job is not None and str(job.parent) not in sweeps:
            sweeps.append(str(job.parent))
        data = run_data(job) if job else {}
        if not data and trial.values:  # no run data (job folder gone): the value the study recorded
            data = {"optimized_metric": pointer.get("optimized_metric"), "best_score": trial.values[0]}
        params = [*attrs.get(sweep.FIXED_ATTR, []), *(f"{k}={v}" for k, v in trial.params.items())]
        overrides = (_overrides(job) if job else None) or params
        status = TRIAL_STATUS.get(trial.state.name, trial.state.name.lower())
        if attrs.get(sweep.CUT_SHORT_ATTR):
            status += " (cut short, ran again)"
        rows.append({"job": str(trial.number), "overrides": overrides, "status": status, **data})
    return rows, sweeps


def sort_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by `metric` (its direction from the metrics table); jobs without it last."""
    from glint_lightning.metrics import logged_metrics  # imports torch: only when a report is written

    sign = -1 if logged_metrics()[metric] == "max" else 1
    return sorted(rows, key=lambda r: (r.get(metric) is None, sign * (r.get(metric) or 0.0), r["job"]))


def _columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    names = {k for r in rows for k in r if k.startswith(("val/", "test/")) and k != metric}
    metrics = sorted(names, key=lambda k: (k.startswith("test/"), k))
    return ["job", "overrides", "status", metric, *metrics, "epochs", "duration_s", "best_checkpoint"]


def _cell(value: Any, column: str) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if column == "duration_s" else f"{value:.4f}"
    return "" if value is None else str(value)


def _rows(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """The rows, the markdown title lines, and the study pointer ({} for a plain sweep)."""
    pointer_file = sweep_dir / STUDY_POINTER
    pointer = yaml.safe_load(pointer_file.read_text()) if pointer_file.is_file() else {}
    study = study_rows(pointer) if pointer else None
    if study is not None:
        rows, sweeps = study
        title = [f"# Optuna study {pointer['study_name']} ({pointer['storage']})", ""]
        title += [f"{len(rows)} trials, launched in {len(sweeps)} sweep folder(s): {', '.join(sweeps)}", ""]
        return rows, title, pointer
    if pointer.get("storage"):  # (a study kept in memory left no storage: its jobs are all there is)
        print(f"warning: {pointer['storage']}: no such study file; reporting the jobs in {sweep_dir}", file=sys.stderr)
    rows = job_rows(sweep_dir)
    if not rows:
        raise GlintError(f"dir={sweep_dir}: no job folders with .hydra/overrides.yaml; pass a multirun folder")
    return rows, [f"# Sweep {sweep_dir}", ""], pointer


def write_report(sweep_dir: Path, metric: str | None = None) -> dict[str, Path]:
    from glint_lightning.metrics import check_metric  # imports torch: --help and option errors stay quick

    rows, title, pointer = _rows(sweep_dir)
    metric = metric or pointer.get("optimized_metric")
    metric = metric or next((r["optimized_metric"] for r in rows if r.get("optimized_metric")), "val/iou")
    check_metric("metric", metric)
    for row in rows:  # the best score tracked during training, when it is the metric asked for
        if row.get("optimized_metric") == metric and row.get("best_score") is not None:
            row[metric] = row["best_score"]
    common = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)]
    for row in rows:  # the table shows what differs between jobs; the rest is said once above it
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in common)
    rows = sort_rows(rows, metric)
    columns = _columns(rows, metric)
    out = {"md": sweep_dir / "report.md", "csv": sweep_dir / "report.csv", "png": sweep_dir / "report.png"}
    with open(out["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [*title, f"Sorted by {metric} (best during training), best first."]
    lines += [f"Overrides common to all {len(rows)} jobs: `{' '.join(common) or '(none)'}`", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    out["md"].write_text("\n".join(lines) + "\n")
    _bar_chart(rows, metric, out["png"])
    return out


def _bar_chart(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get(metric) is not None]
    labels = [f"{r['job']}: {r['overrides'] or '(defaults)'}" for r in done]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(done) + 1.2))
    ax.barh(range(len(done)), [r[metric] for r in done], color="tab:blue")
    ax.set_yticks(range(len(done)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    for i, r in enumerate(done):
        ax.text(r[metric], i, f" {r[metric]:.4f}", va="center", fontsize=8)
    ax.set_title(path.parent.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@hydra_app("report")
def main(cfg: DictConfig) -> dict[str, Path]:
    """glint-report: one table (markdown, CSV, bar chart) for a sweep, or for every trial of an Optuna study."""
    if cfg.dir is None:
        raise GlintError("report: pass the sweep folder, e.g. dir=outputs/multirun/2026-11-24/10-00-00-000000")
    sweep_dir = Path(str(cfg.dir))
    if not sweep_dir.is_dir():
        raise GlintError(f"dir={sweep_dir}: no such folder; pass a multirun folder (outputs/multirun/<date>/<time>)")
    out = write_report(sweep_dir, cfg.metric)
    print(out["md"].read_text())
    print("\n".join(f"wrote {p}" for p in out.values()), flush=True)
    return out


if __name__ == "__main__":
    main()
