"""report.md: the evaluation for a reader — scProto beside PCA, coverage, marker tasks,
and the figures inline."""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scproto.run.directory import atomic_path

if TYPE_CHECKING:
    from scproto.evaluation.pipeline import Evaluation

HEADLINE = {
    "scib/total": "scIB total",
    "scib/batch": "batch (BRAS)",
    "scib/bio": "bio",
    "scib/total_with_asw": "total (batch ASW)",
    "scib/batch_with_asw": "batch (batch ASW)",
    "scgraph/rank_pca": "Rank-PCA",
    "scgraph/corr_pca": "Corr-PCA",
    "scgraph/corr_weighted": "Corr-Weighted",
}
EMBEDDING_NAMES = {"": "scProto", "pca/": "PCA (50 PCs)"}


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def markdown_table(
    frame: pd.DataFrame, index_name: str = "", number: Callable[[Any], str] = _number
) -> str:
    """The frame as a markdown table, its index the first column; cells through ``number``."""
    header = [index_name or (frame.index.name or "")] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.astype(object).iterrows():  # keeps integer columns integer
        label = " / ".join(map(str, index)) if isinstance(index, tuple) else str(index)
        lines.append("| " + " | ".join([label] + [number(v) for v in row]) + " |")
    return "\n".join(lines)


def headline_table(metrics: dict) -> pd.DataFrame | None:
    rows = {
        name: {title: metrics.get(prefix + key) for key, title in HEADLINE.items()}
        for prefix, name in EMBEDDING_NAMES.items()
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table.dropna(how="all").dropna(axis=1, how="all")
    return None if table.empty else table


def write_report(evaluation: "Evaluation", path: Path, *, title: str, n_all: int) -> None:
    metrics, tables, inputs = evaluation.metrics, evaluation.tables, evaluation.inputs
    obs = inputs.obs
    n_query = int((~inputs.is_reference).sum())
    lines = [f"# scProto evaluation{': ' + title if title else ''}", ""]
    sampled = f" (a stratified subsample of {n_all})" if len(obs) < n_all else ""
    lines.append(
        f"{len(obs)} cells{sampled}: {len(obs) - n_query} reference and {n_query} query cells "
        f"from {obs[inputs.batch_key].nunique()} studies"
        + (f", {obs[inputs.label_key].nunique()} cell types." if inputs.label_key else ".")
        + " Embeddings are compared on all of them; the PCA row is a PCA of the same model "
        "input. scIB scores are not min-max scaled; `total` = 0.4 × batch + 0.6 × bio."
        + (
            f" scIB itself ran on a stratified subsample of {int(metrics['eval/scib_cells'])} "
            "of them (`eval.scib.max_cells`): its cost grows faster than the number of cells."
            if "eval/scib_cells" in metrics
            else ""
        )
    )
    lines.append("")
    headline = headline_table(metrics)
    if headline is not None:
        lines += ["## Integration: scIB and scGraph", "", markdown_table(headline, "embedding"), ""]
    if "scib" in tables:
        every = tables["scib"].rename(index={"scproto": "scProto", "pca": "PCA"}).T
        lines += ["All scIB metrics:", "", markdown_table(every, "metric"), ""]
    lines += ["## Prototypes", ""]
    if "coverage/types" in metrics:
        covered = tables["coverage"]
        # owning a prototype means owning one some cell is nearest to
        missing = covered.index[covered["non_empty_prototypes"] == 0].tolist()
        only_empty = covered.index[
            (covered["non_empty_prototypes"] == 0) & (covered["prototypes"] > 0)
        ].tolist()
        lines.append(
            f"{metrics['coverage/prototypes_non_empty']:.0f} prototypes are the nearest of "
            f"some reference cell, {metrics['coverage/prototypes_empty']:.0f} of none. "
            f"Median size {metrics['coverage/prototype_size_median']:.0f} cells, largest "
            f"{metrics['coverage/prototype_size_max']:.0f}. Cell-weighted purity "
            f"{_number(metrics['coverage/purity_mean'])}, study mixing "
            f"{_number(metrics['coverage/study_mixing_mean'])} (0: one study, 1: even). "
            + (
                f"Cell types without a non-empty prototype: {', '.join(missing)}"
                + (f" ({', '.join(only_empty)}: only empty ones)." if only_empty else ".")
                if missing
                else "Every cell type with ≥ 10 cells is the label of a non-empty prototype."
            )
        )
        lines += [
            "",
            "Per cell type (reference cells): prototypes it labels (by the majority of each "
            "prototype's 10 most similar cells), how many of those are non-empty, and the "
            "share of its cells whose prototype's majority type is theirs.",
            "",
            markdown_table(covered),
            "",
        ]
    for caption, figure in evaluation.figures.items():
        if "UMAP" in caption:
            lines += [f"![{caption}]({figure})", ""]
    if "markers" in tables:
        lines += ["## Marker-gene classification", ""]
        lines.append(
            "A logistic regression trained on reference cells, tested on query cells; "
            "features: the cell's marker expression, its nearest prototype's metacell, or "
            "its embedding."
        )
        lines += ["", markdown_table(tables["markers"], "task / features"), ""]
        lines += [f"![{c}]({f})" for c, f in evaluation.figures.items() if "arker" in c]
        lines.append("")
    if any("Training" in c for c in evaluation.figures):
        lines += ["## Training", ""]
        lines += [f"![{c}]({f})" for c, f in evaluation.figures.items() if "Training" in c]
        lines.append("")
    skipped = {
        k.removeprefix("skipped/"): v for k, v in metrics.items() if k.startswith("skipped/")
    }
    if skipped:
        lines += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in skipped.items()] + [""]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in evaluation.timings.items())
    lines += [f"Evaluation took {metrics['time/eval_s']:.1f} s ({timings}).", ""]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines))
