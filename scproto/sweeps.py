"""Collect a finished Hydra multirun (grid or Optuna) into one table and one figure.

A sweep directory holds one job directory per run (`hydra.sweep.subdir`, the job number),
each with `.hydra/overrides.yaml` (the settings of that job) and `metrics.json`.
"""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml

from scproto.evaluation import report
from scproto.run.directory import METRICS

DEFAULT_METRICS = (
    "scib/total",
    "scib/batch",
    "scib/bio",
    "scgraph/corr_weighted",
    "coverage/prototypes_non_empty",
    "coverage/types_without_prototype",
    "train/loss_swav",
    "time/train_s",
)


def parse_override(override: str) -> tuple[str, object]:
    """`key=value` (also `+key=value`) → (key, value as YAML reads it: 0.02 → float)."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), yaml.safe_load(value)


def job_order(job: Path) -> tuple:
    """Hydra's numbered job directories in numeric order (2 before 10), others after."""
    return (0, int(job.name), "") if job.name.isdigit() else (1, 0, job.name)


def read_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per job: its overrides, then every metric; and the swept parameters (the
    overrides whose value differs between jobs). Jobs without metrics.json (crashed or
    still running) are kept with ``status`` saying so."""
    sweep_dir = Path(sweep_dir)
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (*/.hydra/overrides.yaml)")
    rows, setting_names = [], {}  # a dict: the settings' names in first-seen order
    for job in sorted(jobs, key=job_order):
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) or []
        settings = dict(parse_override(o) for o in overrides if not o.startswith("hydra."))
        setting_names |= dict.fromkeys(settings)
        metrics_file = job / METRICS
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        rows.append(
            {
                "job": job.name,
                **settings,
                "status": "done" if metrics else "no metrics.json",
                **metrics,
            }
        )
    table = pd.DataFrame(rows)
    swept = [name for name in setting_names if table[name].astype(str).nunique() > 1]
    return table, swept


def markdown_table(table: pd.DataFrame, swept: list[str], metrics: list[str]) -> str:
    """The swept settings and chosen metrics of every job, best `metrics[0]` first."""
    columns = [*swept, *[m for m in metrics if m in table], "status"]
    shown = table.set_index("job")[columns]
    if metrics and metrics[0] in table:
        shown = shown.sort_values(metrics[0], ascending=False, na_position="last")
    return report.markdown_table(shown, "job", number=_significant) + "\n"


def _significant(value: object) -> str:
    """4 significant digits: sweep settings such as λ_cvae = 0.0037 span decades."""
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def plot_sweep(table: pd.DataFrame, swept: list[str], metrics: list[str], path: Path) -> None:
    """A grid of panels, metric (rows) × swept parameter (columns): every job as a dot,
    the mean over the other parameters as a line."""
    metrics = [m for m in metrics if m in table and table[m].notna().any()]
    if not swept or not metrics:
        return
    fig, axes = plt.subplots(
        len(metrics), len(swept), figsize=(3.2 * len(swept), 2.4 * len(metrics)), squeeze=False
    )
    for i, metric in enumerate(metrics):
        for j, param in enumerate(swept):
            ax = axes[i, j]
            values = pd.to_numeric(table[param], errors="coerce")
            numeric = values.notna().all()
            x = values if numeric else table[param].astype(str)
            ax.scatter(x, table[metric], s=14, alpha=0.7, color="tab:blue")
            means = table.assign(_x=x).groupby("_x")[metric].mean()
            ax.plot(means.index, means.to_numpy(), color="tab:red", lw=1.5, marker="o", ms=3)
            if numeric and values.min() > 0 and values.max() / values.min() >= 20:
                ax.set_xscale("log")
            if i == len(metrics) - 1:
                ax.set_xlabel(param)
            if j == 0:
                ax.set_ylabel(metric, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle("sweep: each dot a job, the line the mean over the other settings", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect_sweep(
    sweep_dir: str | Path, out_dir: str | Path | None = None, metrics: list[str] | None = None
) -> pd.DataFrame:
    """Write sweep.csv (every metric), sweep.md (swept settings and chosen metrics) and
    sweep.png into ``out_dir`` (default: the sweep directory); returns the table."""
    table, swept = read_sweep(sweep_dir)
    metrics = list(metrics or DEFAULT_METRICS)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sweep.csv", index=False)
    (out / "sweep.md").write_text(markdown_table(table, swept, metrics))
    plot_sweep(table, swept, metrics, out / "sweep.png")
    return table
