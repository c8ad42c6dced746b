"""Degenerate data is dropped with the numbers, refused when too little is left, or said."""

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scproto.data.datamodule import ScProtoDataModule
from scproto.data.io import read_h5ad
from scproto.errors import ScProtoInputError
from scproto.train import train


def datamodule(adata, **kwargs):
    settings = dict(batch_key="study", query_studies=["study_3"], n_neighbors=15)
    return ScProtoDataModule(adata, **{**settings, **kwargs})


@pytest.fixture
def adata(small_adata):
    adata = small_adata.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def zero_rows(adata, rows):
    x = adata.X.tolil()
    x[rows] = 0
    adata.X = sp.csr_matrix(x)


def test_all_zero_cells_and_genes_are_dropped_with_the_numbers(adata, caplog):
    zero_rows(adata, [0, 5, 9])
    n_zero_genes = int((np.asarray((adata.X != 0).sum(axis=0)).ravel() == 0).sum())
    with caplog.at_level(logging.WARNING):
        module = datamodule(adata)
    assert f"dropped 3 all-zero cells (of 1500) and {n_zero_genes} all-zero genes (of 500)" in (
        caplog.text
    )
    assert module.adata.shape == (1497, 500 - n_zero_genes)
    assert adata.shape == (1500, 500)  # the caller's object is left as it was


def test_every_cell_zero_is_refused(adata):
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)
    with pytest.raises(ScProtoInputError, match="Every one of the 1500 cells is all-zero"):
        datamodule(adata)


def test_too_few_genes_are_refused(adata):
    with pytest.raises(
        ScProtoInputError, match=r"10 genes with any expression, fewer than data\.min_genes=50"
    ):
        datamodule(adata[:, np.flatnonzero(np.asarray(adata.X.sum(0)).ravel())[:10]].copy())


def test_n_top_genes_above_the_gene_count_is_said(adata, caplog):
    with caplog.at_level(logging.WARNING):
        datamodule(adata, n_top_genes=4000)
    assert "data.n_top_genes=4000 exceeds the" in caplog.text


def test_duplicated_cell_names_are_made_unique_with_a_warning(adata, caplog):
    names = adata.obs_names.to_list()
    names[1] = names[0]
    adata.obs_names = names
    with caplog.at_level(logging.WARNING):
        module = datamodule(adata)
    assert "1 cell names occur more than once" in caplog.text
    assert module.adata.obs_names.is_unique


def test_study_names_with_a_slash_become_safe_metacell_columns(
    make_config, adata, tmp_path, caplog
):
    adata.obs["study"] = adata.obs["study"].cat.rename_categories(
        {"study_0": "lab/a", "study_1": "lab_a"}
    )
    path = tmp_path / "slash.h5ad"
    adata.write_h5ad(path)
    with caplog.at_level(logging.WARNING):
        train(make_config("data=h5ad", f"data.path={path}", "data.query_studies=[study_3]"))
    metacells = ad.read_h5ad(tmp_path / "run" / "metacells.h5ad")
    assert {"n_lab_a", "n_lab_a_2", "n_study_2"} <= set(metacells.obs)
    # the per-study decoded profiles too: one layer each, none overwritten
    assert {"normalized_lab_a", "normalized_lab_a_2", "normalized_study_2"} <= set(metacells.layers)
    assert "cannot store" in caplog.text


def test_a_directory_as_data_path_is_named(tmp_path):
    (tmp_path / "atlas.h5ad").write_text("")
    with pytest.raises(
        ScProtoInputError,
        match=r"is a directory; give the \.h5ad file itself\. It holds atlas\.h5ad",
    ):
        read_h5ad(tmp_path)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "dense"])
@pytest.mark.parametrize("stored_zeros", [False, True])
def test_nonzero_counts_match_numpy_in_every_format(fmt, stored_zeros):
    from scproto.data.io import nonzero_counts

    rng = np.random.default_rng(0)
    dense = rng.random((30, 20)) * (rng.random((30, 20)) < 0.3)
    matrix = sp.csr_matrix(dense)
    if stored_zeros:
        matrix.data[:5] = 0  # explicit zeros must not count
    expected = matrix.toarray()
    matrix = matrix.toarray() if fmt == "dense" else matrix.asformat(fmt)
    for axis in (0, 1):
        np.testing.assert_array_equal(
            nonzero_counts(matrix, axis), np.count_nonzero(expected, axis=axis)
        )


def test_dropping_empty_cells_and_genes_in_place_keeps_the_values_array(small_adata):
    from scproto.data.io import without_empty_cells_and_genes

    adata = small_adata.copy()
    for matrix in (adata.X, adata.layers["counts"]):
        matrix[:, 3] = 0
        matrix[7] = 0
        matrix.eliminate_zeros()
    expected = without_empty_cells_and_genes(adata.copy(), min_genes=1)
    stray = adata.copy()
    stray.layers["counts"][2, 3] = 5.0  # a value the X-based drop would lose: copy instead
    values = adata.X.data
    dropped = without_empty_cells_and_genes(adata, min_genes=1, inplace=True)
    assert np.shares_memory(dropped.X.data, values)
    for name in (None, "counts"):
        ours = dropped.X if name is None else dropped.layers[name]
        theirs = expected.X if name is None else expected.layers[name]
        assert (ours != theirs).nnz == 0
    assert list(dropped.var_names) == list(expected.var_names)
    assert list(dropped.obs_names) == list(expected.obs_names)
    copied = without_empty_cells_and_genes(stray, min_genes=1, inplace=True)
    assert not np.shares_memory(copied.X.data, stray.X.data)
