import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from scproto.data.preprocess import (
    gene_scaling,
    log_normalized,
    looks_like_counts,
    randomized_pca,
    select_genes,
)
from scproto.errors import ScProtoInputError


def low_rank_sparse(n=600, genes=120, rank=6, seed=0):
    rng = np.random.default_rng(seed)
    dense = np.maximum(rng.normal(size=(n, rank)) @ rng.normal(size=(rank, genes)) * 2, 0)
    dense[rng.random(dense.shape) < 0.4] = 0
    return sp.csr_matrix(dense.astype(np.float32))


def test_randomized_pca_matches_exact_pca_up_to_sign():
    matrix = low_rank_sparse()
    ours = randomized_pca(matrix, 10, seed=0)
    exact = PCA(10, svd_solver="full").fit_transform(matrix.toarray())
    for component in range(6):  # the components carrying the signal
        correlation = np.corrcoef(ours[:, component], exact[:, component])[0, 1]
        assert abs(correlation) > 0.999
    np.testing.assert_allclose(ours.var(0)[:6], exact.var(0)[:6], rtol=1e-3)


def test_randomized_pca_is_reproducible():
    matrix = low_rank_sparse()
    np.testing.assert_array_equal(
        randomized_pca(matrix, 8, seed=3), randomized_pca(matrix, 8, seed=3)
    )


def test_counts_detection():
    assert looks_like_counts(sp.csr_matrix(np.array([[0, 2.0], [5.0, 1.0]])))
    assert not looks_like_counts(sp.csr_matrix(np.log1p(np.array([[0, 2.0], [5.0, 1.0]]))))


def test_log_normalisation_of_counts():
    counts = sp.csr_matrix(np.array([[1.0, 3.0], [0.0, 2.0]]))
    out = log_normalized(counts, is_counts=True, target_sum=4.0).toarray()
    np.testing.assert_allclose(out, np.log1p([[1.0, 3.0], [0.0, 4.0]]), rtol=1e-6)
    unchanged = log_normalized(counts, is_counts=False, target_sum=4.0)
    np.testing.assert_array_equal(unchanged.toarray(), counts.toarray())  # log data passes as is


def test_select_genes_reorders_and_zero_fills_with_a_warning():
    matrix = sp.csr_matrix(np.array([[1.0, 2.0, 3.0]]))
    reordered = select_genes(matrix, ["a", "b", "c"], ["c", "a"])
    np.testing.assert_array_equal(reordered.toarray(), [[3.0, 1.0]])
    with pytest.warns(UserWarning, match="1 of the model's 3 genes are missing"):
        filled = select_genes(matrix, ["a", "b", "c"], ["c", "zzz", "a"])
    np.testing.assert_array_equal(filled.toarray(), [[3.0, 0.0, 1.0]])


def test_select_genes_fails_clearly_without_overlap():
    with pytest.raises(ScProtoInputError, match="Only 0 of the model's 2 genes"):
        select_genes(sp.csr_matrix(np.ones((1, 2))), ["a", "b"], ["x", "y"])


def test_pca_of_chosen_rows_fitted_on_a_subsample_stays_close_to_the_full_fit():
    matrix = low_rank_sparse(n=3000)
    rows = np.arange(0, 3000, 2)
    full = randomized_pca(matrix[rows], 6, seed=0)
    np.testing.assert_allclose(randomized_pca(matrix, 6, seed=0, rows=rows), full, atol=1e-3)
    sub = randomized_pca(matrix, 6, seed=0, rows=rows, max_fit_cells=500)
    assert sub.shape == full.shape
    # the same subspace (components of similar variance may rotate within it)
    coefficients, *_ = np.linalg.lstsq(full, sub, rcond=None)
    residual = ((sub - full @ coefficients) ** 2).sum() / ((sub - sub.mean(0)) ** 2).sum()
    assert residual < 0.01


def test_in_place_normalisation_equals_the_copy_block_by_block(monkeypatch):
    import scproto.data.preprocess as preprocess

    counts = sp.random(500, 40, density=0.3, format="csr", dtype=np.float32, random_state=1)
    counts.data = np.ceil(counts.data * 10)
    expected = log_normalized(counts, is_counts=True, target_sum=1e4)
    assert counts.data.max() > 1.5  # the input is left as it was
    monkeypatch.setattr(preprocess, "NORMALIZE_BLOCK_ROWS", 64)
    blocked = counts.copy()
    result = log_normalized(blocked, is_counts=True, target_sum=1e4, inplace=True)
    assert np.shares_memory(result.data, blocked.data)  # no second copy of the data
    np.testing.assert_allclose(result.toarray(), expected.toarray(), rtol=1e-6)


def test_hvgs_of_chosen_rows_equal_those_of_the_sliced_matrix():
    from scproto.data.preprocess import highly_variable_genes

    matrix = low_rank_sparse(n=400)
    names = [f"g{i}" for i in range(matrix.shape[1])]
    rows = np.arange(0, 400, 3)
    chosen = highly_variable_genes(matrix, names, n_top_genes=30, flavor="seurat", rows=rows)
    assert chosen == highly_variable_genes(matrix[rows], names, n_top_genes=30, flavor="seurat")
    assert len(chosen) == 30


def scaled_by_scanpy(dense, groups, max_value=10.0):
    import anndata as ad
    import scanpy as sc

    out = np.empty_like(dense)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = sc.pp.scale(ad.AnnData(dense[rows].copy()), max_value=max_value, copy=True).X
    return out


def test_gene_scaling_is_scanpys_scale_on_each_group():
    dense = low_rank_sparse(n=900).toarray()
    dense[:300, 0] = 0.0  # a gene constant in one group scales to 0, not to nan
    matrix = sp.csr_matrix(dense)
    rows = np.arange(900)
    groups = np.repeat([2, 0, 1], 300)
    scaling = gene_scaling(matrix, rows, groups, max_value=3.0)
    scaled = scaling.rows(matrix, rows[::-1])  # any order of rows
    expected = scaled_by_scanpy(matrix.toarray(), groups, max_value=3.0)[::-1]
    np.testing.assert_allclose(scaled, expected, atol=1e-4)
    assert np.abs(scaled).max() == 3.0  # clipped
    assert (scaled[:, 0][::-1][:300] == 0).all()


def test_pca_of_scaled_rows_equals_the_pca_of_the_dense_scaled_matrix(monkeypatch):
    import scproto.data.preprocess as preprocess

    matrix = low_rank_sparse(n=1200)
    rows = np.arange(100, 1200)
    groups = np.arange(rows.size) % 3
    scaling = gene_scaling(matrix, rows, groups)
    monkeypatch.setattr(preprocess, "SCALE_BLOCK_ROWS", 257)  # products over several blocks
    ours = randomized_pca(matrix, 6, seed=0, rows=rows, scaling=scaling)
    dense = scaled_by_scanpy(matrix[rows].toarray(), groups)
    reference = randomized_pca(sp.csr_matrix(dense), 6, seed=0)
    np.testing.assert_allclose(ours, reference, atol=1e-3)
