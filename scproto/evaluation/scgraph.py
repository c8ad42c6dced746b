"""scGraph (Wang, Leskovec & Regev, "metric mirages"): does an embedding keep the
cell-type geometry that each batch shows on its own?

Each batch with enough cells gives a reference: its own HVGs and 10-component PCA,
trimmed-mean centroids per cell type, centroid distances with each column divided by its
max. The batch matrices are averaged (missing pairs ignored) into a consensus. The
embedding's centroid distances are then compared with the consensus column by column:
Rank-PCA (Spearman), Corr-PCA (Pearson) and Corr-Weighted (Pearson weighted by 1/reference
distance). Faithful to the reference implementation (Genentech/Islander `src/scGraph.py`,
PyPI `scgraph-eval`), including the zero self pair in Rank- and Corr-PCA; unlike it, a cell
type seen only in skipped batches is left out of the comparison instead of crashing it.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy.spatial.distance import cdist
from scipy.stats import trim_mean

log = logging.getLogger(__name__)

SCORE_NAMES = ("rank_pca", "corr_pca", "corr_weighted")


def trimmed_centroids(
    x: np.ndarray, labels: Sequence, trim: float = 0.05, ignore: Sequence = ()
) -> pd.DataFrame:
    """Per-label centroid (rows, sorted by label): the mean after cutting ``trim`` of the
    values at each end of every dimension, robust to stray cells."""
    labels = pd.Series(np.asarray(labels))
    kept = sorted(set(labels.unique()) - set(ignore))
    rows = [
        trim_mean(x[(labels == label).to_numpy()], proportiontocut=trim, axis=0) for label in kept
    ]
    return pd.DataFrame(np.vstack(rows) if rows else np.empty((0, x.shape[1])), index=kept)


def normalized_distances(centroids: pd.DataFrame) -> pd.DataFrame:
    """Euclidean distances between centroids, each column divided by its largest value."""
    distances = pd.DataFrame(
        cdist(centroids.to_numpy(), centroids.to_numpy()),
        index=centroids.index,
        columns=centroids.index,
    )
    return distances / distances.max(axis=0)


def consensus(batch_distances: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean of the per-batch distance matrices over the batches holding each pair, rows in
    column order, each column re-normalised by its max."""
    stacked = pd.concat(batch_distances, axis=0, sort=False)
    mean = stacked.groupby(level=0).mean()
    mean = mean.loc[mean.columns, :]
    return mean / mean.max(axis=0)


def weighted_pearson(x: np.ndarray, y: np.ndarray, reference_distance: np.ndarray) -> float:
    """Pearson correlation with weights 1/distance, normalised to sum 1; a zero distance
    (the self pair) gets weight 0, so near neighbours in the reference count most."""
    distance = np.asarray(reference_distance, dtype=float)
    with np.errstate(divide="ignore"):
        weights = np.where(distance == 0, 0.0, 1.0 / distance)
    weights = weights / weights.sum()
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx = x - np.average(x, weights=weights)
    dy = y - np.average(y, weights=weights)
    covariance = np.sum(weights * dx * dy)
    return float(covariance / np.sqrt(np.sum(weights * dx**2) * np.sum(weights * dy**2)))


def column_scores(embedding: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per cell-type column: Spearman, Pearson and weighted Pearson of the embedding's
    distances against the reference's, over the pairs both define."""
    rows = {}
    for column in embedding.columns:
        pair = pd.concat([embedding[column], reference[column]], axis=1).dropna()
        mine, theirs = pair.iloc[:, 0], pair.iloc[:, 1]
        rows[column] = {
            "rank_pca": mine.corr(theirs, method="spearman"),
            "corr_pca": mine.corr(theirs, method="pearson"),
            "corr_weighted": weighted_pearson(mine.to_numpy(), theirs.to_numpy(), theirs.to_numpy())
            if len(pair) > 1
            else np.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(SCORE_NAMES))


@dataclass
class BatchReference:
    """The consensus distances and what went into them."""

    distances: pd.DataFrame
    ignored_types: list[str] = field(default_factory=list)
    skipped_batches: list[str] = field(default_factory=list)


def batch_reference(
    expression: ad.AnnData,
    batch_key: str,
    label_key: str,
    *,
    trim: float = 0.05,
    min_batch_cells: int = 100,
    min_type_cells: int = 10,
    n_top_genes: int = 1000,
    n_comps: int = 10,
) -> BatchReference:
    """Consensus of per-batch PCA centroid distances. ``expression.X`` is log-normalised.

    Cell types with fewer than ``min_type_cells`` cells overall are ignored, batches with
    fewer than ``min_batch_cells`` cells skipped. Each batch gets its own seurat HVGs and
    PCA through scanpy, as in the reference code.
    """
    labels = expression.obs[label_key]
    counts = labels.value_counts()
    ignored = sorted(str(t) for t in counts.index[counts < min_type_cells])
    per_batch, skipped = [], []
    for batch in expression.obs[batch_key].unique():
        cells = expression[(expression.obs[batch_key] == batch).to_numpy()].copy()
        if cells.n_obs < min_batch_cells:
            skipped.append(str(batch))
            continue
        sc.pp.highly_variable_genes(cells, n_top_genes=n_top_genes)
        sc.pp.pca(cells, n_comps=n_comps, mask_var="highly_variable")
        centroids = trimmed_centroids(cells.obsm["X_pca"], cells.obs[label_key], trim, ignored)
        per_batch.append(normalized_distances(centroids))
    if not per_batch:
        raise ValueError(f"no batch has ≥ {min_batch_cells} cells")
    return BatchReference(consensus(per_batch), ignored, skipped)


def scgraph_scores(
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence,
    reference: BatchReference,
    trim: float = 0.05,
) -> pd.DataFrame:
    """Rank-PCA, Corr-PCA and Corr-Weighted (columns) of each embedding (rows).

    Cell types absent from the reference (seen only in skipped batches) are left out
    before the embedding's distances are normalised; the reference code raises a KeyError.
    """
    labels = pd.Series(np.asarray(labels))
    scored = set(reference.distances.columns)
    unscored = sorted(set(labels.unique()) - scored - set(reference.ignored_types))
    if unscored:
        log.warning("scGraph: cell types %s occur only in skipped batches; not scored", unscored)
    ignore = set(labels.unique()) - scored
    rows = {}
    for name, x in embeddings.items():
        distances = normalized_distances(trimmed_centroids(np.asarray(x), labels, trim, ignore))
        rows[name] = column_scores(distances, reference.distances).mean()
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(SCORE_NAMES))


def configured_reference(expression, settings) -> BatchReference:
    """:func:`batch_reference` of an AnnData with obs 'batch' and 'label', with the
    ``eval.scgraph`` settings."""
    return batch_reference(
        expression,
        "batch",
        "label",
        trim=settings.trim,
        min_batch_cells=settings.min_batch_cells,
        min_type_cells=settings.min_type_cells,
        n_top_genes=settings.n_top_genes,
        n_comps=settings.n_comps,
    )
