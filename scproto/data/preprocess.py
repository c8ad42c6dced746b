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


def log_normalized(matrix, *, is_counts: bool, target_sum: float) -> sp.csr_matrix:
    """log1p(counts / library size × target_sum), or the log data unchanged, as float32 CSR."""
    matrix = as_csr32(matrix)
    if not is_counts:
        return matrix
    normalized = sc.pp.normalize_total(ad.AnnData(matrix), target_sum=target_sum, inplace=False)[
        "X"
    ]
    return as_csr32(sc.pp.log1p(as_csr32(normalized)))


def select_genes(
    matrix: sp.csr_matrix, var_names, genes, *, min_overlap: float = 0.5
) -> sp.csr_matrix:
    """Columns of ``matrix`` reordered to ``genes``; absent genes are zero-filled with a warning."""
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
    log_data: sp.csr_matrix, var_names, *, n_top_genes: int, flavor: str, counts=None
) -> list[str]:
    """Names of the HVGs (in data order), from the reference cells only."""
    if n_top_genes >= len(var_names):
        return list(map(str, var_names))
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


def randomized_pca(
    matrix: sp.csr_matrix, n_components: int, *, seed: int, n_oversamples: int = 10, n_iter: int = 4
) -> np.ndarray:
    """Cell coordinates on the top principal components, centring implicitly (stays sparse).

    Halko, Martinsson & Tropp's randomized range finder with power iterations. scanpy's
    arpack PCA takes ~17 s on 30k × 4k cells; this needs ~2·n_iter + 2 sparse products.
    """
    n_cells, n_genes = matrix.shape
    n_components = min(n_components, n_cells - 1, n_genes)
    rank = min(n_components + n_oversamples, n_genes)
    mean = np.asarray(matrix.mean(axis=0), dtype=np.float64).ravel().astype(np.float32)
    transposed = matrix.T.tocsr()

    def times(v: np.ndarray) -> np.ndarray:  # (X − 1μᵀ) v
        return matrix @ v - mean @ v

    def transpose_times(u: np.ndarray) -> np.ndarray:  # (X − 1μᵀ)ᵀ u
        return transposed @ u - np.outer(mean, u.sum(axis=0))

    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(times(rng.standard_normal((n_genes, rank), dtype=np.float32)))
    for _ in range(n_iter):
        basis, _ = np.linalg.qr(times(np.linalg.qr(transpose_times(basis))[0]))
    small = transpose_times(basis).T  # rank × genes
    u_small, singular_values, _ = np.linalg.svd(small, full_matrices=False)
    coordinates = (basis @ u_small[:, :n_components]) * singular_values[:n_components]
    # Sign convention so results do not flip with BLAS: the largest |coordinate| of each component is positive.
    signs = np.sign(coordinates[np.abs(coordinates).argmax(axis=0), np.arange(n_components)])
    return (coordinates * signs).astype(np.float32)
