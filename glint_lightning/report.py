"""`python -m glint_lightning.report outputs/multirun/<date>/<time> [metric=val/iou]`: one table for a sweep.

Reads every job's overrides (`.hydra/overrides.yaml`) and results (`metrics.json`: best and final metrics,
epochs, duration, checkpoints), and writes `report.md`, `report.csv` and `report.png` (the metric per job, best
first) into the sweep folder. Jobs without results (failed or still running) are listed as such, last.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from glint_lightning.errors import GlintError, exit_on_user_error, parse_options
from glint_lightning.metrics import check_metric, logged_metrics

DEFAULTS = {"sweep_dir": None, "metric": None}


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder (a folder with .hydra/overrides.yaml) under `sweep_dir`."""
    rows = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job = overrides_file.parent.parent
        row: dict[str, Any] = {"job": job.name, "overrides": yaml.safe_load(overrides_file.read_text()) or []}
        metrics_file = job / "metrics.json"
        if metrics_file.is_file():
            summary = json.loads(metrics_file.read_text())
            row.update(status="done", epochs=summary.get("epochs"), duration_s=summary.get("duration_s"))
            row.update(optimized_metric=summary.get("optimized_metric"), best_score=summary.get("best_score"))
            row.update(summary.get("final", {}))
            row.update(summary.get("test", {}))
            row["best_checkpoint"] = summary.get("best_checkpoint")
        else:
            row["status"] = "failed or unfinished"
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by `metric` (its direction from the metrics table); jobs without it last."""
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


def write_report(sweep_dir: Path, metric: str | None = None) -> dict[str, Path]:
    rows = job_rows(sweep_dir)
    if not rows:
        raise GlintError(f"{sweep_dir}: no job folders with .hydra/overrides.yaml; pass a multirun folder")
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
    lines = [f"# Sweep {sweep_dir}", "", f"Sorted by {metric} (best during training), best first."]
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


def main(argv: list[str]) -> None:
    with exit_on_user_error():
        positional = [a for a in argv if "=" not in a]
        args = parse_options("report", DEFAULTS, [a for a in argv if "=" in a])
        sweep_dir = Path(positional[0] if positional else args.sweep_dir or "")
        if not positional and not args.sweep_dir:
            raise GlintError("report: pass the multirun folder, e.g. outputs/multirun/2026-11-24/10-00-00-000000")
        if not sweep_dir.is_dir():
            raise GlintError(f"{sweep_dir}: no such folder; pass a multirun folder (outputs/multirun/<date>/<time>)")
        out = write_report(sweep_dir, args.metric)
        print(out["md"].read_text())
        print("\n".join(f"wrote {p}" for p in out.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
