"""Properties of the synthetic multi-study generator (not its implementation)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from scproto.datasets.synthetic import make_synthetic

QUERY_CORE = {"CD4 T", "CD8 T", "NK"}
RARE_TYPE = "Megakaryocyte"


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return make_synthetic()


def _log_normalised(counts: sparse.csr_matrix) -> np.ndarray:
    size = np.asarray(counts.sum(axis=1)).ravel()
    return (sparse.diags(1e4 / size) @ counts).log1p().toarray()


def _pca(counts: sparse.csr_matrix, n_components: int = 30, n_top: int = 500) -> np.ndarray:
    """PCA of the ``n_top`` most variable log-normalised genes, as in a standard workflow."""
    log_expression = _log_normalised(counts)
    top = np.argsort(log_expression.var(axis=0))[-n_top:]
    # One BLAS thread: the matrix is small, and threads oversubscribe busy machines badly.
    with threadpool_limits(1):
        return PCA(n_components, random_state=0).fit_transform(log_expression[:, top])


def _knn_purity(embedding: np.ndarray, labels: pd.Series, k: int = 15) -> float:
    """Mean share of each cell's k nearest neighbours (itself excluded) sharing its label."""
    neighbours = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(return_distance=False)
    labels = labels.to_numpy()
    return float((labels[neighbours] == labels[:, None]).mean())


def _study_purity(adata: ad.AnnData) -> float:
    return _knn_purity(_pca(adata.X), adata.obs["study"])


def test_same_seed_gives_identical_data_and_other_seed_differs():
    first, again = (make_synthetic(n_cells=800, n_genes=500, seed=7) for _ in range(2))
    other = make_synthetic(n_cells=800, n_genes=500, seed=8)

    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(first.X, name), getattr(again.X, name))
    pd.testing.assert_frame_equal(first.obs, again.obs)
    pd.testing.assert_frame_equal(first.var, again.var)
    assert first.uns["synthetic"] == again.uns["synthetic"]
    assert (first.X != other.X).nnz > 0


def test_counts_are_sparse_float32_integers(adata):
    assert adata.shape == (6000, 2000)
    assert isinstance(adata.X, sparse.csr_matrix)
    assert adata.X.dtype == np.float32
    assert np.all(adata.X.data > 0)
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))
    assert (adata.layers["counts"] != adata.X).nnz == 0


def test_density_is_realistic(adata):
    density = adata.X.nnz / np.prod(adata.shape)
    assert 0.05 < density < 0.2


def test_annotations(adata):
    for column in ("study", "cell_type", "lineage", "split"):
        assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype)
    assert set(adata.obs["split"].cat.categories) == {"reference", "query"}
    assert adata.obs_names.is_unique and adata.obs_names[0] == "cell_0"
    assert adata.var_names.is_unique
    markers = adata.var["marker_of"] != ""
    assert adata.var_names[~markers].str.fullmatch(r"GENE\d{4}").all()
    for gene, program in [("CD3E", "T cell"), ("CD8A", "CD8 T"), ("PPBP", RARE_TYPE)]:
        assert program in adata.var.loc[gene, "marker_of"].split(",")


def test_round_trips_through_h5ad(adata, tmp_path):
    path = tmp_path / "synthetic.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["synthetic"]["seed"] == 0
    assert list(back.uns["query_studies"]) == adata.uns["query_studies"]
    assert (back.X != adata.X).nnz == 0


def test_rare_type_is_rare_but_learnable(adata):
    n_rare = int((adata.obs["cell_type"] == RARE_TYPE).sum())
    assert n_rare >= 15
    assert n_rare / adata.n_obs < 0.01


def test_last_studies_are_query(adata):
    studies = adata.obs["study"].cat.categories
    assert len(studies) >= 3
    assert adata.uns["query_studies"] == [studies[-1]]
    is_query = adata.obs["study"].isin(adata.uns["query_studies"])
    assert (is_query == (adata.obs["split"] == "query")).all()


def test_reference_covers_every_type_and_query_holds_the_core(adata):
    reference = adata.obs.loc[adata.obs["split"] == "reference", "cell_type"]
    query = adata.obs.loc[adata.obs["split"] == "query", "cell_type"]
    assert set(reference) == set(adata.obs["cell_type"].cat.categories)
    assert len(set(query)) >= 3
    assert QUERY_CORE <= set(query)


def test_compositions_differ_and_overlap_only_partially(adata):
    counts = pd.crosstab(adata.obs["study"], adata.obs["cell_type"])
    shares = counts.div(counts.sum(axis=1), axis=0).to_numpy()
    total_variation = 0.5 * np.abs(shares[:, None] - shares[None]).sum(axis=-1)
    assert total_variation.max() > 0.1
    assert (counts.drop(columns=RARE_TYPE) == 0).to_numpy().any()


def test_library_sizes_differ_between_studies(adata):
    size = pd.Series(np.asarray(adata.X.sum(axis=1)).ravel(), index=adata.obs_names)
    medians = size.groupby(adata.obs["study"], observed=True).median()
    assert medians.max() / medians.min() > 2


def test_highly_expressed_genes_are_overdispersed(adata):
    cells = (adata.obs["study"] == "study_0") & (adata.obs["cell_type"] == "CD4 T")
    counts = adata.X[cells.to_numpy()].toarray()
    mean, variance = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    high = mean > 5
    assert high.sum() >= 20
    assert np.all(variance[high] > mean[high])


def test_canonical_markers_peak_in_their_lineage(adata):
    expression = pd.DataFrame(
        _log_normalised(adata.X)[:, adata.var_names.get_indexer(["CD3E", "MS4A1", "LYZ", "PPBP"])],
        columns=["T cell", "B cell", "Myeloid", RARE_TYPE],
    )
    means = expression.groupby(adata.obs["lineage"].to_numpy(), observed=True).mean()
    for lineage in expression.columns:
        assert means[lineage].idxmax() == lineage


def test_studies_show_a_batch_effect(adata):
    shares = adata.obs["study"].value_counts(normalize=True)
    baseline = float((shares**2).sum())  # purity expected from study sizes alone
    assert _study_purity(adata) > baseline + 0.5


def test_batch_strength_controls_the_batch_effect():
    kwargs = {"n_cells": 1600, "n_genes": 600, "seed": 1}
    weak = make_synthetic(batch_strength=0.0, **kwargs)
    strong = make_synthetic(batch_strength=0.6, **kwargs)
    assert _study_purity(weak) + 0.2 < _study_purity(strong)


def test_lineages_separate_and_subtypes_are_subtler_within_a_study(adata):
    one_study = adata[adata.obs["study"] == "study_0"]
    embedding = _pca(one_study.X)
    lineage_purity = _knn_purity(embedding, one_study.obs["lineage"])
    type_purity = _knn_purity(embedding, one_study.obs["cell_type"])
    assert lineage_purity > 0.8
    assert type_purity < lineage_purity


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_studies": 1}, "n_studies"),
        ({"query_studies": 4}, "query_studies"),
        ({"query_studies": -1}, "query_studies"),
        ({"n_genes": 100}, "n_genes"),
        ({"n_cells": 10}, "n_cells"),
        ({"n_cells": 1000.5}, "n_cells"),
        ({"batch_strength": -0.1}, "batch_strength"),
        ({"batch_strength": float("nan")}, "batch_strength"),
        ({"seed": -1}, "seed"),
        ({"taxonomy": "mouse"}, "taxonomy.*pbmc, immune_atlas"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(**kwargs)


def test_the_test_data_has_the_expressed_gene_count_the_tests_expect(small_adata):
    from scproto.data.io import nonzero_counts
    from tests.conftest import N_EXPRESSED_GENES

    assert int((nonzero_counts(small_adata.X, 0) > 0).sum()) == N_EXPRESSED_GENES


def test_the_immune_atlas_has_a_hierarchy_with_subtle_subtypes_and_three_rare_types():
    atlas = make_synthetic(
        n_cells=12000, n_genes=800, n_studies=6, query_studies=2, seed=1, taxonomy="immune_atlas"
    )
    types = atlas.obs["cell_type"]
    assert len(types.cat.categories) >= 12 and atlas.obs["study"].nunique() == 6
    share = types.value_counts(normalize=True)
    rare = share[share < 0.01]
    assert set(rare.index) == {"Plasmablast", "pDC", "Megakaryocyte"}
    reference = atlas.obs.loc[atlas.obs["split"] == "reference", "cell_type"]
    assert set(reference) == set(types.cat.categories)
    assert atlas.uns["query_studies"] == ["study_4", "study_5"]
    # Treg and MAIT sit within the T-cell lineage, apart from their parent in a few genes
    one_study = atlas[atlas.obs["study"] == "study_0"]
    t_cells = one_study[one_study.obs["lineage"] == "T cell"]
    embedding = _pca(t_cells.X)
    assert _knn_purity(_pca(one_study.X), one_study.obs["lineage"]) > 0.8
    assert 0.5 < _knn_purity(embedding, t_cells.obs["cell_type"]) < 0.99
    markers = atlas.var["marker_of"]
    assert markers.str.contains("Treg").sum() == 6 and markers.str.contains("MAIT").sum() == 7


def test_rows_are_stacked_like_vstack_and_the_counts_layer_is_optional():
    from scipy import sparse

    from scproto.datasets.synthetic import _stack_rows

    blocks = [
        sparse.random(n, 7, density=0.3, format="csr", dtype=np.float32, random_state=n)
        for n in (3, 1, 5)
    ]
    expected = sparse.vstack(blocks, format="csr")
    stacked = _stack_rows(list(blocks), 7)
    assert (stacked != expected).nnz == 0 and stacked.shape == expected.shape
    full, lean = (
        make_synthetic(n_cells=600, n_genes=400),
        make_synthetic(n_cells=600, n_genes=400, counts_layer=False),
    )
    assert "counts" not in lean.layers and (lean.X != full.layers["counts"]).nnz == 0
