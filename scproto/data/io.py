"""Reading AnnData and checking it at the boundary, with messages that say what to do."""

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from scproto.errors import ScProtoInputError

log = logging.getLogger(__name__)

# Stored values handled at a time by whole-matrix passes (casts, comparisons): their
# temporaries stay ~100 MB however large the atlas.
BLOCK_ENTRIES = 1 << 24

# Where users get the paper's files; these machines cannot download them.
KNOWN_DOWNLOADS = {
    "Immune_ALL_human.h5ad": "https://figshare.com/ndownloader/files/25717328",
    "human_pancreas_norm_complexBatch.h5ad": "https://figshare.com/ndownloader/files/24539828",
}


def read_h5ad(
    path: str | Path,
    *,
    layers: Sequence[str] | None = None,
    backed: bool = False,
    x: bool = True,
) -> ad.AnnData:
    """Read an .h5ad file, with a message naming the path (and the download) if it is missing.

    ``layers``: read only ``obs``, ``var``, ``uns``, ``X`` and these layers, leaving every
    other layer and ``obsm``/``obsp``/``varm``/``varp`` on disk (a counts layer beside X
    doubles the memory of an atlas); ``None`` reads everything.
    ``backed``: X and those layers stay in the file as anndata sparse datasets (read a
    block of rows at a time by :mod:`scproto.data.backed`); the file stays open.
    ``x=False`` leaves X in the file too (a run that trains on a layer).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5ad"))[:5]
        listing = f" It holds {', '.join(found)}." if found else " It holds no .h5ad file."
        raise ScProtoInputError(
            f"`data.path={path}` is a directory; give the .h5ad file itself.{listing}"
        )
    if not path.is_file():
        hint = ""
        if path.name in KNOWN_DOWNLOADS:
            hint = (
                f" This is a scIB benchmark file: download it from {KNOWN_DOWNLOADS[path.name]} "
                f"and save it as {path}, or set `paths.data_dir` to its folder (or `data.path` to the file)."
            )
        raise ScProtoInputError(
            f"Data file not found: {path.resolve()}. Check `data.path` (relative paths are "
            f"resolved from the directory you run from).{hint}"
        )
    try:
        if layers is None and not backed and x:
            return ad.read_h5ad(path)
        return _read_parts(path, layers or [], backed=backed, x=x)
    except ScProtoInputError:
        raise
    except Exception as error:  # h5py/anndata raise many types for a corrupt file
        raise ScProtoInputError(
            f"Could not read {path} as an AnnData .h5ad file ({type(error).__name__}: {error})."
        ) from error


def _read_parts(path: Path, layers: Sequence[str], backed: bool, x: bool) -> ad.AnnData:
    file = h5py.File(path, "r")
    try:
        stored = list(file["layers"]) if "layers" in file else []
        missing = [name for name in layers if name not in stored]
        if missing:
            raise ScProtoInputError(
                f"layers {missing} are not in {path}; layers present: {stored or 'none'}."
            )
        skipped = [name for name in stored if name not in layers]
        skipped += [k for k in ("obsm", "obsp", "varm", "varp") if k in file and len(file[k])]
        skipped += [] if x or "X" not in file else ["X"]
        if skipped:
            log.info("%s: not read, as the run does not use them: %s", path.name, skipped)

        def matrix(element):
            if not backed:
                return read_elem(element)
            return element if isinstance(element, h5py.Dataset) else sparse_dataset(element)

        return ad.AnnData(
            X=matrix(file["X"]) if x and "X" in file else None,
            obs=read_elem(file["obs"]),
            var=read_elem(file["var"]),
            uns=read_elem(file["uns"]) if "uns" in file else None,
            layers={name: matrix(file["layers"][name]) for name in layers},
        )
    finally:
        if not backed:  # backed: the datasets read from the open file until it is collected
            file.close()


def _require_obs_key(adata: ad.AnnData, key: str, role: str, allow_missing: bool = False) -> None:
    if key not in adata.obs:
        available = ", ".join(map(repr, adata.obs.columns[:20])) or "none"
        raise ScProtoInputError(
            f"obs key {key!r} ({role}) is not in the data. Available obs columns: {available}. "
            f"Set `data.{role}` to one of them."
        )
    n_missing = int(adata.obs[key].isna().sum())
    if n_missing and allow_missing:
        warnings.warn(f"obs[{key!r}] ({role}) is missing for {n_missing} cells.", stacklevel=3)
    elif n_missing:
        raise ScProtoInputError(
            f"obs[{key!r}] ({role}) has {n_missing} missing values; fill or drop those cells first."
        )


def matrix_values(matrix) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no densification)."""
    return matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()


def is_whole(values: np.ndarray, block: int = BLOCK_ENTRIES) -> bool:
    """Whole numbers up to float32 rounding (counts that went through a float pipeline).

    In blocks: the rounded copy and the comparison of a whole atlas would be several GB."""
    return all(
        np.allclose(part, np.round(part), rtol=0, atol=1e-3)
        for part in (values[i : i + block] for i in range(0, values.size, block))
    )


def check_expression(matrix, *, where: str, expect_counts: bool) -> None:
    """Finite, non-negative values; integers too when counts are expected."""
    values = matrix_values(matrix)
    if not np.isfinite(values).all():
        raise ScProtoInputError(
            f"{where} holds {int((~np.isfinite(values)).sum())} non-finite values (NaN or inf). "
            "Remove or impute them before training."
        )
    if (values < 0).any():
        raise ScProtoInputError(
            f"{where} holds {int((values < 0).sum())} negative values (minimum {values.min():.3g}); "
            "expected raw counts or log-normalised expression. Scaled or centred data (e.g. after "
            "sc.pp.scale) cannot be used: pass the counts, or the log-normalised matrix."
        )
    if expect_counts and not is_whole(values):
        raise ScProtoInputError(
            f"{where} was given as counts but holds non-integer values (e.g. {values[values != np.round(values)][0]:.4g}). "
            "Point `data.counts_layer` at the raw counts, or set it to null to use the log data in X."
        )


def check_gene_names(var_names) -> None:
    """Genes are matched by name, so names must be unique."""
    names = pd.Index(var_names)
    duplicated = names[names.duplicated()].unique()
    if len(duplicated):
        raise ScProtoInputError(
            f"{len(duplicated)} gene names occur more than once (e.g. {', '.join(map(str, duplicated[:5]))}). "
            "Genes are matched by name: make them unique first, e.g. adata.var_names_make_unique()."
        )


def validate_anndata(
    adata: ad.AnnData,
    *,
    batch_key: str,
    label_key: str | None,
    counts_layer: str | None,
    query_studies: Sequence[str],
    n_neighbors: int,
    min_cells_per_study: int,
    check_values: bool = True,
) -> None:
    """Every check a user can fail before any computation starts.

    ``check_values=False`` leaves out the pass over the matrices' values (a matrix on disk
    is checked block by block as it is scanned, :func:`scproto.data.backed.scan`).
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ScProtoInputError(f"The data is empty ({adata.n_obs} cells × {adata.n_vars} genes).")
    check_gene_names(adata.var_names)
    _require_obs_key(adata, batch_key, "batch_key")
    if label_key is not None:
        _require_obs_key(adata, label_key, "label_key", allow_missing=True)  # evaluation only
    if counts_layer is not None and counts_layer not in adata.layers:
        raise ScProtoInputError(
            f"layers[{counts_layer!r}] (data.counts_layer) is not in the data; layers present: "
            f"{list(adata.layers.keys()) or 'none'}. Set `data.counts_layer=null` to use X."
        )
    if check_values:
        check_expression(adata.X, where="X", expect_counts=False)
    if counts_layer is not None and check_values:
        check_expression(
            adata.layers[counts_layer], where=f"layers[{counts_layer!r}]", expect_counts=True
        )

    studies = adata.obs[batch_key].astype(str)
    unknown = sorted(set(query_studies) - set(studies))
    if unknown:
        raise ScProtoInputError(
            f"query studies {unknown} are not values of obs[{batch_key!r}]; present: "
            f"{sorted(studies.unique())[:20]}."
        )
    reference_sizes = studies[~studies.isin(list(query_studies))].value_counts()
    if len(reference_sizes) < 2:
        raise ScProtoInputError(
            f"obs[{batch_key!r}] has {len(reference_sizes)} reference study "
            f"({', '.join(reference_sizes.index)}); scProto integrates studies and needs at least 2. "
            "Check `data.batch_key` (it should name the study/batch column) and `data.query_studies`."
        )
    if reference_sizes.sum() < n_neighbors + 1:
        raise ScProtoInputError(
            f"Only {reference_sizes.sum()} reference cells, fewer than n_neighbors + 1 = "
            f"{n_neighbors + 1}. Lower `data.n_neighbors` or provide more cells."
        )
    small = reference_sizes[reference_sizes < min_cells_per_study]
    if len(small):
        listing = ", ".join(f"{name!r} ({count} cells)" for name, count in small.items())
        raise ScProtoInputError(
            f"Studies with fewer than data.min_cells_per_study={min_cells_per_study} cells in "
            f"obs[{batch_key!r}]: {listing}. Their per-study prototype assignment would be noise: "
            "drop or merge them, or lower `data.min_cells_per_study`."
        )


def _dropped(adata: ad.AnnData, cells: np.ndarray, genes: np.ndarray) -> ad.AnnData:
    """``adata[cells, genes]`` for cells and genes with no stored values: CSR rows and
    columns that hold nothing are removed without touching the values."""

    def holds_nothing_dropped(m) -> bool:
        if not (sp.issparse(m) and m.format == "csr" and m.has_canonical_format):
            return False
        stored_per_gene = index_counts(m.indices, m.shape[1])
        return not stored_per_gene[~genes].any() and not np.diff(m.indptr)[~cells].any()

    # each matrix once: X may be one of the layers (a layer trained on, an uncopied counts layer)
    distinct = {id(m): m for m in [adata.X, *adata.layers.values()]}
    if not all(holds_nothing_dropped(m) for m in distinct.values()):
        return adata[cells, genes].copy()
    column = (np.cumsum(genes) - 1).astype(np.int32)

    def drop(matrix: sp.csr_matrix) -> sp.csr_matrix:
        indices, block = matrix.indices, BLOCK_ENTRIES  # numpy's take would cast all to int64
        for start in range(0, indices.size, block):  # every stored column is kept
            indices[start : start + block] = column[indices[start : start + block]]
        indptr = np.concatenate([[0], matrix.indptr[1:][cells]])
        return sp.csr_matrix(
            (matrix.data, matrix.indices, indptr), shape=(int(cells.sum()), int(genes.sum()))
        )

    dropped = {key: drop(matrix) for key, matrix in distinct.items()}
    return ad.AnnData(
        X=dropped[id(adata.X)],
        obs=adata.obs[cells],
        var=adata.var[genes],
        uns=adata.uns,
        obsm={k: v[cells] for k, v in adata.obsm.items()},
        layers={k: dropped[id(v)] for k, v in adata.layers.items()},
    )


def nonzero_counts(matrix, axis: int) -> np.ndarray:
    """Non-zero values per row (axis=1) or column (axis=0); stored zeros do not count.

    CSR/CSC without stored zeros (the usual case) are counted from their index arrays,
    without a temporary the size of the matrix.
    """
    if not sp.issparse(matrix):
        return np.count_nonzero(np.asarray(matrix), axis=axis)
    if matrix.format not in ("csr", "csc") or not np.all(matrix.data):
        return np.asarray((matrix != 0).sum(axis=axis)).ravel()
    along_index = (matrix.format == "csr") == (axis == 0)  # columns of CSR, rows of CSC
    if along_index:
        return index_counts(matrix.indices, matrix.shape[1 - axis])
    return np.diff(matrix.indptr)


def index_counts(indices: np.ndarray, n: int, block: int = BLOCK_ENTRIES) -> np.ndarray:
    """``np.bincount(indices, minlength=n)`` in blocks: bincount casts int32 indices to
    int64 first, a 3 GB temporary for a million-cell atlas."""
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, indices.size, block):
        counts += np.bincount(indices[start : start + block], minlength=n)
    return counts


def without_empty_cells_and_genes(
    adata: ad.AnnData,
    *,
    min_genes: int,
    inplace: bool = False,
    nonzero: tuple[np.ndarray, np.ndarray] | None = None,
) -> ad.AnnData:
    """``adata`` less its all-zero cells and genes (a copy, only when there are some), with
    unique cell names; refused when too little is left to learn from.

    ``inplace``: CSR matrices keep their values array, and their column indices are
    renumbered in place (``adata`` itself is then unusable): no copy of a large atlas.
    ``nonzero``: the non-zero values per cell and per gene, counted elsewhere (X on disk,
    :func:`scproto.data.backed.scan`); ``adata`` then holds no matrices, only obs and var.
    """
    if adata.X is None and nonzero is None:
        raise ScProtoInputError("The data has no expression matrix (X is None).")
    if adata.n_obs == 0 or adata.n_vars == 0:
        return adata  # validate_anndata says it is empty
    if nonzero is None:
        nonzero = nonzero_counts(adata.X, 1), nonzero_counts(adata.X, 0)
    cells, genes = nonzero[0] > 0, nonzero[1] > 0
    if not cells.any():
        raise ScProtoInputError(
            f"Every one of the {adata.n_obs} cells is all-zero in X: there is no expression "
            "to learn from. Check that X (or data.counts_layer) holds the expression matrix."
        )
    if not (cells.all() and genes.all()):
        log.warning(
            "dropped %d all-zero cells (of %d) and %d all-zero genes (of %d): they carry no "
            "expression; %d × %d remain",
            (~cells).sum(),
            adata.n_obs,
            (~genes).sum(),
            adata.n_vars,
            cells.sum(),
            genes.sum(),
        )
        if inplace and adata.X is not None:
            adata = _dropped(adata, cells, genes)
        else:
            adata = adata[cells, genes].copy()
    if adata.n_vars < min_genes:
        raise ScProtoInputError(
            f"The data has {adata.n_vars} genes with any expression, fewer than data.min_genes="
            f"{min_genes}: too few to learn cell states from. Give the full gene panel, or lower "
            "`data.min_genes` for a targeted panel."
        )
    duplicated = adata.obs_names[adata.obs_names.duplicated()]
    if len(duplicated):
        adata.obs_names_make_unique()
        log.warning(
            "%d cell names occur more than once (e.g. %r); made unique by appending -1, -2, … "
            "(the outputs use these names)",
            len(duplicated),
            duplicated[0],
        )
    return adata
