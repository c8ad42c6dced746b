"""evaluate(): every metric of SPEC §7 on one run, for scProto and the PCA baseline; writes
metrics.json, report.md, coverage.csv, scib.csv and figures/ into the output directory."""

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from scproto.evaluation import figures
from scproto.evaluation.coverage import prototype_coverage
from scproto.evaluation.inputs import EvaluationInputs, stratified_subsample
from scproto.evaluation.markers import MarkerTask, marker_task_scores
from scproto.evaluation.report import write_report
from scproto.evaluation.scgraph import configured_reference, scgraph_scores
from scproto.evaluation.scib import scib_scores, skip_reason, use_jax_platform
from scproto.outputs import prototype_index
from scproto.run.directory import (
    FIGURES,
    REPORT,
    RESULT_TABLES,
    atomic_path,
)
from scproto.timing import timed

log = logging.getLogger(__name__)

EMBEDDINGS = {"scproto": "scProto (μ)", "pca": "PCA"}
# Key namespaces evaluate() owns; re-evaluating a run replaces exactly these.
NAMESPACES = (
    "scib/",
    "scgraph/",
    "markers/",
    "coverage/",
    "pca/",
    "eval/",
    "skipped/",
    "time/eval",
)


def is_evaluation_key(key: str) -> bool:
    return key.startswith(NAMESPACES)


class Evaluation:
    """Collects the flat metrics, the tables and the figures of one evaluation."""

    def __init__(self, inputs: EvaluationInputs, cfg: DictConfig, out_dir: Path, seed: int):
        self.inputs, self.cfg, self.seed = inputs, cfg, seed
        self.out_dir = Path(out_dir)
        self.figure_dir = self.out_dir / FIGURES
        self.metrics: dict[str, Any] = {}
        self.tables: dict[str, pd.DataFrame] = {}
        self.figures: dict[str, str] = {}  # caption → path relative to out_dir
        self.timings: dict[str, float] = {}

    def skip(self, component: str, reason: str) -> None:
        log.warning("evaluation: %s skipped: %s", component, reason)
        self.metrics[f"skipped/{component}"] = reason

    def figure(self, name: str, caption: str, draw: Callable[[Path], None]) -> None:
        self.figure_dir.mkdir(parents=True, exist_ok=True)
        path = self.figure_dir / f"{name}.png"
        draw(path)
        self.figures[caption] = str(path.relative_to(self.out_dir))

    # ------------------------------------------------------------------ components
    def embeddings(self, inputs: EvaluationInputs | None = None) -> dict[str, np.ndarray]:
        inputs = inputs or self.inputs
        chosen = {"scproto": inputs.latent}
        if self.cfg.pca_baseline:
            chosen["pca"] = inputs.pca
        return chosen

    def record_rows(self, table: pd.DataFrame, family: str) -> None:
        for embedding, row in table.iterrows():
            prefix = "" if embedding == "scproto" else f"{embedding}/"
            for metric, value in row.items():
                self.metrics[f"{prefix}{family}/{metric}"] = float(value)

    def scib(self) -> None:
        inputs, max_cells = self.inputs, self.cfg.scib.get("max_cells")
        if max_cells and len(inputs.obs) > max_cells:
            inputs = inputs.subset(stratified_subsample(_strata(inputs), max_cells, self.seed))
            log.info(
                "scIB on a stratified subsample of %d of the %d cells (eval.scib.max_cells)",
                len(inputs.obs),
                len(self.inputs.obs),
            )
            self.metrics["eval/scib_cells"] = float(len(inputs.obs))
        batches = inputs.obs[inputs.batch_key]
        reason = skip_reason(batches, inputs.labels)
        if reason:
            return self.skip("scib", reason)
        use_jax_platform(self.cfg.jax_platform)
        table = scib_scores(
            self.embeddings(inputs),
            batches,
            inputs.labels,
            inputs.pca,
            # scib-metrics nests two bars: readable on a terminal, escape codes in a log
            progress_bar=self.cfg.progress_bar and sys.stderr.isatty(),
        )
        self.tables["scib"] = table
        self.record_rows(table, "scib")

    def scgraph(self) -> None:
        inputs, settings = self.inputs, self.cfg.scgraph
        reason = skip_reason(inputs.obs[inputs.batch_key], inputs.labels)
        if reason:
            return self.skip("scgraph", reason)
        expression = _expression_anndata(inputs)
        try:
            reference = configured_reference(expression, settings)
        except ValueError as error:
            return self.skip("scgraph", str(error))
        table = scgraph_scores(self.embeddings(), expression.obs["label"], reference, settings.trim)
        self.tables["scgraph"] = table
        self.record_rows(table, "scgraph")
        if reference.skipped_batches:
            self.metrics["scgraph/skipped_batches"] = len(reference.skipped_batches)

    def coverage(self) -> None:
        inputs = self.inputs
        if inputs.labels is None:
            return self.skip("coverage", "no cell-type labels (data.label_key is not set)")
        studies = inputs.obs[inputs.batch_key][inputs.is_reference]
        summary, per_type = prototype_coverage(
            inputs.metacells.obs,
            inputs.labels[inputs.is_reference],
            prototype_index(inputs.obs["prototype"])[inputs.is_reference],
            n_studies=studies.nunique(),
            min_cells=self.cfg.coverage.min_cells,
        )
        self.metrics |= summary
        self.tables["coverage"] = per_type

    def markers(self) -> None:
        inputs = self.inputs
        if inputs.labels is None:
            return self.skip("markers", "no cell-type labels (data.label_key is not set)")
        scores = {}
        for name, spec in (self.cfg.markers.tasks or {}).items():
            task = MarkerTask.from_config(name, spec)
            classes = task.class_of(inputs.labels)
            reason = task.skip_reason(inputs.genes, classes, inputs.is_reference)
            if reason:
                self.skip(f"markers/{name}", reason)
                continue
            expression = _gene_frame(inputs, task.genes)
            metacells = inputs.metacells[:, list(task.genes)].to_df()
            prototype = prototype_index(inputs.obs["prototype"])
            result = marker_task_scores(
                task,
                expression=expression,
                metacell_expression=metacells,
                prototype=prototype,
                latent=inputs.latent,
                classes=classes,
                is_reference=inputs.is_reference,
            )
            for feature, values in result.items():
                for metric, value in values.items():
                    self.metrics[f"markers/{name}/{feature}/{metric}"] = value
            scores[name] = result
            if self.cfg.figures.enabled:
                self.marker_figure(task, classes, expression, metacells)
        if scores:
            table = pd.DataFrame(
                {(t, f): values for t, result in scores.items() for f, values in result.items()}
            ).T
            self.tables["markers"] = table.astype({"n_correct": int, "n_test": int})
            if self.cfg.figures.enabled:
                macro = {t: {f: v["f1_macro"] for f, v in r.items()} for t, r in scores.items()}
                self.figure(
                    "marker_f1",
                    "Marker-gene classification, macro F1 on query cells",
                    lambda path: figures.plot_f1_bars(macro, path),
                )

    def marker_figure(
        self, task: MarkerTask, classes: pd.Series, cells: pd.DataFrame, metacells: pd.DataFrame
    ) -> None:
        table = self.inputs.metacells.obs
        in_use = ~table["is_empty"].to_numpy()
        self.figure(
            f"markers_{task.name}",
            f"Marker task {task.name}: single cells vs metacells",
            lambda path: figures.plot_marker_scatter(
                task.name,
                task.genes,
                cells,
                classes,
                metacells[in_use],
                task.class_of(table["label_top10"])[in_use],
                table["n_cells"].to_numpy()[in_use],
                path,
            ),
        )

    def umap(self) -> None:
        inputs, settings = self.inputs, self.cfg.figures
        cells = np.arange(len(inputs.obs))
        if settings.max_cells and len(cells) > settings.max_cells:
            cells = stratified_subsample(_strata(inputs), settings.max_cells, self.seed)
        unit = inputs.latent[cells] / np.linalg.norm(inputs.latent[cells], axis=1, keepdims=True)
        table = inputs.metacells.obs
        in_use = ~table["is_empty"].to_numpy()
        cell_xy = figures.umap_coordinates(unit, settings.umap_neighbors, self.seed)
        points = inputs.metacells.obsm.get("decoding_point")
        prototype_xy = figures.place_prototypes(
            cell_xy,
            inputs.latent[cells],
            inputs.prototypes[in_use],
            None if points is None else np.asarray(points)[in_use],
        )
        obs = inputs.obs.iloc[cells]
        labels = None if inputs.label_key is None else obs[inputs.label_key]
        self.figure(
            "umap_prototypes",
            "Cells and prototypes on a UMAP of the scProto embedding",
            lambda path: figures.plot_umap_prototypes(
                cell_xy,
                prototype_xy,
                cell_types=labels,
                studies=obs[inputs.batch_key],
                prototype_labels=table["label_top10"][in_use] if labels is not None else None,
                prototype_cells=table["n_cells"].to_numpy()[in_use],
                n_empty=int((~in_use).sum()),
                path=path,
            ),
        )

    def loss_curves(self) -> None:
        if self.inputs.history is None:
            return self.skip("loss_curves", "the run has no csv/metrics.csv (CSV logger off)")
        self.figure(
            "loss_curves",
            "Training curves of every loss term and diagnostic",
            lambda path: figures.plot_loss_curves(self.inputs.history, path),
        )


def _strata(inputs: EvaluationInputs) -> pd.Series:
    strata = inputs.obs[inputs.batch_key].astype(str)
    if inputs.label_key:
        strata = strata + "|" + inputs.obs[inputs.label_key].astype(str)
    return strata


def _expression_anndata(inputs: EvaluationInputs):
    import anndata as ad

    obs = pd.DataFrame(
        {
            "batch": inputs.obs[inputs.batch_key].astype(str).to_numpy(),
            "label": inputs.labels.astype(str).to_numpy(),
        },
        index=inputs.obs.index.astype(str),
    )
    return ad.AnnData(inputs.expression, obs=obs, var=pd.DataFrame(index=inputs.genes))


def _gene_frame(inputs: EvaluationInputs, genes) -> pd.DataFrame:
    columns = [inputs.genes.index(g) for g in genes]
    values = inputs.expression[:, columns].toarray()
    return pd.DataFrame(values, columns=list(genes))


def evaluate(
    inputs: EvaluationInputs, cfg: DictConfig, out_dir: Path, *, seed: int = 0, title: str = ""
) -> dict[str, Any]:
    """Run the enabled components; write the results into ``out_dir``; return the metrics."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    start = time.perf_counter()
    n_all = len(inputs.obs)
    if cfg.subsample and n_all > cfg.subsample:
        inputs = inputs.subset(stratified_subsample(_strata(inputs), cfg.subsample, seed))
    evaluation = Evaluation(inputs, cfg, out_dir, seed)
    evaluation.metrics["eval/cells"] = float(len(inputs.obs))
    steps = [
        ("coverage", True, evaluation.coverage),
        ("markers", cfg.markers.enabled, evaluation.markers),
        ("scgraph", cfg.scgraph.enabled, evaluation.scgraph),
        ("scib", cfg.scib.enabled, evaluation.scib),
        ("umap", cfg.figures.enabled, evaluation.umap),
        ("loss_curves", cfg.figures.enabled, evaluation.loss_curves),
    ]
    for name, enabled, step in steps:
        if enabled:
            with timed(name, evaluation.timings, log):
                step()
    for name, seconds in evaluation.timings.items():
        evaluation.metrics[f"time/eval_{name}_s"] = seconds
    evaluation.metrics["time/eval_s"] = time.perf_counter() - start
    write_report(evaluation, out_dir / REPORT, title=title, n_all=n_all)
    for name in RESULT_TABLES:
        if name in evaluation.tables:
            with atomic_path(out_dir / f"{name}.csv") as path:
                evaluation.tables[name].to_csv(path)
    return evaluation.metrics


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    """metrics.json: flat keys, sorted; NaN written as null (valid JSON)."""
    clean = {
        key: (None if isinstance(value, float) and not np.isfinite(value) else value)
        for key, value in sorted(metrics.items())
    }
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(clean, indent=2) + "\n")
