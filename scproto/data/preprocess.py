"""From a user's AnnData to the model input: log-normalised expression of the model genes.

The same two functions (:func:`log_normalized` then :func:`select_genes`) prepare the
training data and any data given to a saved model later, so both see identical inputs.
"""

import logging
import warnings
from dataclasses import asdict, dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from scproto.data.io import is_whole, matrix_values
from scproto.errors import ScProtoInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """How the model input was made; stored in every checkpoint."""

    genes: tuple[str, ...]
    source: str  # "X" or the name of a layer
    is_counts: bool  # True: normalise_total + log1p was applied
    target_sum: float = 1e4
    counts_layer: str | None = None  # raw counts, needed by the NB likelihood

    def to_dict(self) -> dict:
        return {**asdict(self), "genes": list(self.genes)}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(**{**data, "genes": tuple(data["genes"])})


def looks_like_counts(matrix, n_rows: int = 2_000) -> bool | None:
    """True when the stored values are whole numbers (raw counts), False for log data,
    None when the rows looked at hold no non-zero value to tell by.

    Looks at rows spread over the whole matrix: atlases are concatenations of studies.
    """
    rows = np.unique(np.linspace(0, matrix.shape[0] - 1, min(n_rows, matrix.shape[0])).astype(int))
    values = matrix_values(matrix[rows])
    values = values[values != 0]
    return is_whole(values) if values.size else None


def as_csr32(matrix) -> sp.csr_matrix:
    return sp.csr_matrix(matrix, dtype=np.float32)


NORMALIZE_BLOCK_ROWS = 65_536  # rows normalised at a time: bounds scanpy's temporaries


def log_normalized(
    matrix, *, is_counts: bool, target_sum: float, inplace: bool = False
) -> sp.csr_matrix:
    """log1p(counts / library size × target_sum), or the log data unchanged, as float32 CSR.

    ``inplace`` overwrites the values of ``matrix`` (when it is already float32 CSR) instead
    of making a second copy of the data; otherwise ``matrix`` is left as it was. Rows are normalised in blocks, each by scanpy,
    so the working memory is one block whatever the size of the data.
    """
    result = as_csr32(matrix)
    if not is_counts:
        return result
    if not inplace and sp.issparse(matrix) and np.shares_memory(result.data, matrix.data):
        result = result.copy()
    for start in range(0, result.shape[0], NORMALIZE_BLOCK_ROWS):
        block = ad.AnnData(result[start : start + NORMALIZE_BLOCK_ROWS])
        sc.pp.normalize_total(block, target_sum=target_sum)
        sc.pp.log1p(block)
        entries = slice(result.indptr[start], result.indptr[start + block.n_obs])
        result.data[entries] = block.X.data
    return result


def select_genes(
    matrix: sp.csr_matrix, var_names, genes, *, min_overlap: float = 0.5
) -> sp.csr_matrix:
    """Columns of ``matrix`` reordered to ``genes``; absent genes are zero-filled with a warning."""
    if list(map(str, var_names)) == list(genes):  # every gene, in order: no copy
        return as_csr32(matrix)
    position = pd.Index(var_names).get_indexer(list(genes))
    present = position >= 0
    n_missing = int((~present).sum())
    if present.mean() < min_overlap:
        raise ScProtoInputError(
            f"Only {int(present.sum())} of the model's {len(genes)} genes are in the data "
            f"(need at least {min_overlap:.0%}). Genes are matched by var_names: check that both "
            "use the same identifiers (symbols vs Ensembl IDs)."
        )
    if n_missing == 0:
        return as_csr32(matrix[:, position])
    warnings.warn(
        f"{n_missing} of the model's {len(genes)} genes are missing from the data and are "
        "zero-filled; embeddings degrade as this grows.",
        stacklevel=2,
    )
    # A trailing all-zero column stands in for every missing gene.
    padded = sp.hstack([as_csr32(matrix), sp.csr_matrix((matrix.shape[0], 1), dtype=np.float32)])
    return as_csr32(padded.tocsc()[:, np.where(present, position, matrix.shape[1])])


def source_matrix(adata: ad.AnnData, spec_source: str):
    return adata.X if spec_source == "X" else adata.layers[spec_source]


def highly_variable_genes(
    log_data: sp.csr_matrix,
    var_names,
    *,
    n_top_genes: int,
    flavor: str,
    counts=None,
    rows: np.ndarray | None = None,
) -> list[str]:
    """Names of the HVGs (in data order), from ``rows`` (the reference cells; all by default).

    The rows are taken only when HVGs are selected at all: a copy of most of an atlas."""
    if n_top_genes >= len(var_names):
        return list(map(str, var_names))
    if rows is not None:
        log_data = log_data[rows]
        counts = None if counts is None else counts[rows]
    if flavor == "seurat_v3":
        if counts is None:
            raise ScProtoInputError(
                "HVG flavour 'seurat_v3' needs raw counts: set `data.counts_layer` or use "
                "`data.hvg_flavor=seurat`."
            )
        adata = ad.AnnData(as_csr32(counts), var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    else:
        adata = ad.AnnData(log_data, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=flavor, subset=False)
    return list(adata.var_names[adata.var["highly_variable"].to_numpy()])


HVG_MAX_CELLS = 200_000  # HVGs chosen from a random subsample this large (data.hvg_max_cells)
PROJECT_BLOCK_ROWS = 131_072  # rows projected onto the components at a time
PCA_MAX_CELLS = 200_000  # above this the components are fitted on a subsample (data.pca_max_cells)
SCALE_MAX_VALUE = 10.0  # scaled values clipped here, as sc.pp.scale(max_value=10)
SCALE_BLOCK_ROWS = 16_384  # scaled rows made dense at a time


@dataclass(frozen=True)
class GeneScaling:
    """Each gene centred and scaled to unit variance within each group of rows (study), then
    clipped at ±``max_value``: ``sc.pp.scale(max_value=10)`` on every study alone (scIB's
    ``scale_batch``), made dense one block of rows at a time so a sparse atlas never is whole.

    Without it the PCA is ruled by the few genes of largest variance, which a study effect
    inflates; scaled, a handful of marker genes of a rare population count as much as any.
    """

    group: np.ndarray  # each matrix row's group (-1: a row the statistics did not see)
    mean: np.ndarray  # groups × genes
    inverse_sd: np.ndarray  # groups × genes; 0 for a gene constant in the group
    max_value: float = SCALE_MAX_VALUE

    def rows(self, matrix: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
        """``matrix[rows]`` scaled, dense float32."""
        group = self.group[rows]
        block = np.asarray(matrix[rows].toarray(), dtype=np.float32)
        block -= self.mean[group]
        block *= self.inverse_sd[group]
        return np.clip(block, -self.max_value, self.max_value, out=block)


def gene_scaling(
    matrix: sp.csr_matrix,
    rows: np.ndarray,
    groups: np.ndarray,
    *,
    max_value: float = SCALE_MAX_VALUE,
) -> GeneScaling:
    """The :class:`GeneScaling` of ``matrix[rows]`` with ``groups`` (one per row): each
    group's gene means and standard deviations (with Bessel's correction, as scanpy)."""
    rows = np.asarray(rows)
    codes, group_of_row = np.unique(np.asarray(groups), return_inverse=True)
    n_genes = matrix.shape[1]
    sums = np.zeros((len(codes), n_genes))
    squares = np.zeros((len(codes), n_genes))
    for start in range(0, rows.size, PROJECT_BLOCK_ROWS):
        block = slice(start, start + PROJECT_BLOCK_ROWS)
        values = matrix[rows[block]]
        indicator = sp.csr_matrix(
            (np.ones(values.shape[0]), (group_of_row[block], np.arange(values.shape[0]))),
            shape=(len(codes), values.shape[0]),
        )
        sums += np.asarray((indicator @ values).todense())
        squares += np.asarray((indicator @ values.multiply(values)).todense())
    counts = np.bincount(group_of_row, minlength=len(codes))[:, None].astype(np.float64)
    mean = sums / counts
    variance = np.maximum(squares / counts - mean**2, 0) * counts / np.maximum(counts - 1, 1)
    sd = np.sqrt(variance)
    group = np.full(matrix.shape[0], -1, dtype=np.int64)
    group[rows] = group_of_row
    return GeneScaling(
        group,
        mean.astype(np.float32),
        np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0).astype(np.float32),
        max_value,
    )


def randomized_pca(
    matrix: sp.csr_matrix,
    n_components: int,
    *,
    seed: int,
    rows: np.ndarray | None = None,
    max_fit_cells: int | None = None,
    scaling: GeneScaling | None = None,
    n_oversamples: int = 10,
    n_iter: int = 4,
) -> np.ndarray:
    """Coordinates of ``matrix[rows]`` (all rows by default) on the top principal components.

    Halko, Martinsson & Tropp's randomized range finder with power iterations, centring
    implicitly so nothing is densified (scanpy's arpack PCA takes ~17 s on 30k × 4k cells;
    this needs ~2·n_iter + 2 sparse products). Above ``max_fit_cells`` rows the components
    are fitted on a random subsample of that size, then every row is projected: the top
    components of a large atlas are settled long before a million cells, and the products
    over all cells (scipy runs them on one core) were most of the PCA's time.
    With ``scaling`` the PCA is of the scaled rows (:class:`GeneScaling`), which each
    product makes dense block by block.
    """
    rows = np.arange(matrix.shape[0]) if rows is None else np.asarray(rows)
    rng = np.random.default_rng(seed)
    fit_rows = rows
    if max_fit_cells is not None and rows.size > max_fit_cells:
        fit_rows = np.sort(rng.choice(rows, max_fit_cells, replace=False))
    n_genes = matrix.shape[1]
    n_components = min(n_components, fit_rows.size - 1, n_genes)
    rank = min(n_components + n_oversamples, n_genes)
    if scaling is None:
        fit = matrix[fit_rows] if fit_rows.size < matrix.shape[0] else matrix
        block_rows = PROJECT_BLOCK_ROWS

        def product(v: np.ndarray) -> np.ndarray:  # X v
            return fit @ v

        def transpose_product(u: np.ndarray) -> np.ndarray:  # Xᵀ u; Xᵀ is a CSC view, no copy
            return fit.T @ u

        def values(block: np.ndarray) -> sp.csr_matrix:
            return matrix[block]

        mean = np.asarray(fit.mean(axis=0), dtype=np.float64).ravel().astype(np.float32)
    else:
        block_rows = SCALE_BLOCK_ROWS
        blocks = [fit_rows[i : i + block_rows] for i in range(0, fit_rows.size, block_rows)]

        def product(v: np.ndarray) -> np.ndarray:
            return np.concatenate([scaling.rows(matrix, block) @ v for block in blocks])

        def transpose_product(u: np.ndarray) -> np.ndarray:
            starts = np.cumsum([0] + [block.size for block in blocks])
            return sum(
                scaling.rows(matrix, block).T @ u[start : start + block.size]
                for block, start in zip(blocks, starts[:-1], strict=True)
            )

        def values(block: np.ndarray) -> np.ndarray:
            return scaling.rows(matrix, block)

        # clipping leaves the scaled values' mean a little off zero
        mean = transpose_product(np.ones((fit_rows.size, 1), np.float32)).ravel() / fit_rows.size
        mean = mean.astype(np.float32)

    def times(v: np.ndarray) -> np.ndarray:  # (X − 1μᵀ) v
        return product(v) - mean @ v

    def transpose_times(u: np.ndarray) -> np.ndarray:  # (X − 1μᵀ)ᵀ u
        return transpose_product(u) - np.outer(mean, u.sum(axis=0))

    basis, _ = np.linalg.qr(times(rng.standard_normal((n_genes, rank), dtype=np.float32)))
    for _ in range(n_iter):
        basis, _ = np.linalg.qr(times(np.linalg.qr(transpose_times(basis))[0]))
    small = transpose_times(basis).T  # rank × genes
    _, _, components = np.linalg.svd(small, full_matrices=False)
    components = components[:n_components].T.astype(np.float32)  # genes × components
    offset = mean @ components
    coordinates = np.empty((rows.size, n_components), dtype=np.float32)
    for start in range(0, rows.size, block_rows):
        block = rows[start : start + block_rows]
        coordinates[start : start + block.size] = values(block) @ components - offset
    # Sign convention so results do not flip with BLAS: the largest |coordinate| of each component is positive.
    signs = np.sign(coordinates[np.abs(coordinates).argmax(axis=0), np.arange(n_components)])
    return coordinates * signs
