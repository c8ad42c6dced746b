"""What neighbour views are built from, the same way for training and for query cells: the
kNN graph on PCA (a cell's neighbours are its other views) and each study's own PCA (the
geometry L_geometry keeps)."""

import numpy as np
import scipy.sparse as sp

from scproto.data import knn
from scproto.data.preprocess import PCA_MAX_CELLS, gene_scaling, randomized_pca


def pca_neighbors(
    x: sp.csr_matrix,
    rows: np.ndarray,
    *,
    n_pcs: int,
    n_neighbors: int,
    kind: str = "exact",
    seed: int = 0,
    nprobe: int = 16,
    min_recall: float = 0.95,
    pca_max_cells: int | None = PCA_MAX_CELLS,
    groups: np.ndarray | None = None,
    mnn_neighbors: int = 0,
    mnn_slots: int = 0,
    scaling: str = "none",
) -> tuple[np.ndarray, np.ndarray, float]:
    """The ``n_neighbors`` nearest rows (positions within ``rows``) of each of ``x[rows]``
    on its top ``n_pcs`` components, their squared distances and the search's recall.

    Fewer rows than ``n_neighbors`` + 1 take every other row; a single row is its own
    neighbour (its views are copies of it).

    ``mnn_neighbors`` = k (with ``groups``, each row's study): the list gains ``mnn_slots``
    columns drawn from the row's mutual nearest neighbours in other studies
    (:func:`knn.mutual_neighbors`). A study effect puts a cell's PCA neighbours in its
    own study; these cross-study views give SwAV pairs of the same population across
    studies to agree on, beside the per-study balance of its codes.

    ``scaling``: the PCA is of the log data as it is (``none``, the paper's), of every gene
    scaled to unit variance over all rows (``all``) or within each of ``groups`` (``study``),
    clipped at ±10 (:func:`~scproto.data.preprocess.gene_scaling`).
    """
    rows = np.asarray(rows)
    if len(rows) < 2:
        return np.zeros((len(rows), 1), np.int64), np.zeros((len(rows), 1), np.float32), 1.0
    coordinates = randomized_pca(
        x,
        n_pcs,
        seed=seed,
        rows=rows,
        max_fit_cells=pca_max_cells,
        scaling=scaling_of(x, rows, groups, scaling),
    )
    k = min(n_neighbors, len(rows) - 1)
    neighbors, distances, recall = knn.knn_graph(
        coordinates, k, kind=kind, seed=seed, nprobe=nprobe, min_recall=min_recall
    )
    if mnn_neighbors and mnn_slots and groups is not None:
        partners = knn.mutual_neighbors(coordinates, groups, mnn_neighbors, seed=seed)
        neighbors, distances = knn.with_partners(
            neighbors, distances, coordinates, partners, mnn_slots, seed=seed
        )
    return neighbors, distances, recall


def scaling_of(x: sp.csr_matrix, rows: np.ndarray, groups: np.ndarray | None, scaling: str):
    """The ``data.pca_scaling`` setting as a :class:`~scproto.data.preprocess.GeneScaling`
    of ``x[rows]`` (None for ``none``)."""
    if scaling == "none":
        return None
    if scaling == "all":
        return gene_scaling(x, rows, np.zeros(len(rows), np.int64))
    if scaling == "study":
        if groups is None:
            raise ValueError("scaling='study' needs the study of every row (groups)")
        return gene_scaling(x, rows, groups)
    raise ValueError(f"scaling must be 'none', 'all' or 'study', not {scaling!r}")


def study_pca(
    x: sp.csr_matrix,
    rows: np.ndarray,
    groups: np.ndarray,
    *,
    n_components: int,
    smoothing: int = 0,
    seed: int = 0,
    pca_max_cells: int | None = PCA_MAX_CELLS,
    approximate_above: int | None = 200_000,
) -> np.ndarray:
    """Each of ``x[rows]`` on the top ``n_components`` components of its own group (study)
    alone, float32, one row per row (zero-padded where a study has fewer components).

    A study's own PCA has no study effect in it, and its leading components hold the
    differences between cell types while the trailing ones are mostly sampling noise.
    With ``smoothing`` = k, each cell is replaced by the mean of itself and its k nearest
    cells of the study: the spread inside a population (noise) shrinks, the distances
    between populations stay.
    """
    rows, groups = np.asarray(rows), np.asarray(groups)
    pca = np.zeros((len(rows), n_components), dtype=np.float32)
    for group in np.unique(groups):
        cells = np.flatnonzero(groups == group)
        coordinates = randomized_pca(
            x, n_components, seed=seed, rows=rows[cells], max_fit_cells=pca_max_cells
        )
        if smoothing and len(cells) > smoothing:
            coordinates = knn.neighbourhood_means(
                coordinates, smoothing, seed=seed, approximate_above=approximate_above
            )
        pca[cells, : coordinates.shape[1]] = coordinates
    return pca
