import numpy as np
import pytest
import scipy.sparse as sp

from scproto.data import graph
from scproto.data.preprocess import randomized_pca


def blobs(n_per=40, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(3, n_genes))
    x = np.concatenate([c + rng.normal(size=(n_per, n_genes)) for c in centres])
    return sp.csr_matrix(x.astype(np.float32)), np.repeat(np.arange(3), n_per)


def test_neighbours_are_positions_among_the_rows_and_stay_in_their_cluster():
    x, cluster = blobs()
    rows = np.arange(10, 120)  # a subset: neighbours index into it, not into x
    neighbors, distances, recall = graph.pca_neighbors(x, rows, n_pcs=5, n_neighbors=8)
    assert neighbors.shape == distances.shape == (110, 8) and recall == 1.0
    assert neighbors.max() < len(rows)
    assert (cluster[rows][neighbors] == cluster[rows][:, None]).all()


def test_mnn_columns_widen_the_list_with_partners_from_other_studies_in_the_same_cluster():
    x, cluster = blobs()
    rows = np.arange(10, 120)
    studies = np.arange(len(rows)) % 2  # each cluster in both studies, no study effect
    plain, plain_distances, _ = graph.pca_neighbors(x, rows, n_pcs=5, n_neighbors=8)
    wider, _, _ = graph.pca_neighbors(
        x, rows, n_pcs=5, n_neighbors=8, groups=studies, mnn_neighbors=4, mnn_slots=3
    )
    assert wider.shape == (110, 11)
    np.testing.assert_array_equal(wider[:, :8], plain)  # the kNN columns are unchanged
    partners = wider[:, 8:]
    assert (cluster[rows][partners] == cluster[rows][:, None]).all()
    has = (studies[partners] != studies[:, None]).all(axis=1)
    assert has.mean() > 0.5  # most cells found partners; the others drew from their own list
    off, off_distances, _ = graph.pca_neighbors(
        x, rows, n_pcs=5, n_neighbors=8, groups=studies, mnn_neighbors=0, mnn_slots=3
    )
    np.testing.assert_array_equal(off, plain)
    np.testing.assert_array_equal(off_distances, plain_distances)


def test_few_rows_take_every_other_row_and_one_row_is_its_own_neighbour():
    x, _ = blobs()
    neighbors, _, _ = graph.pca_neighbors(x, np.arange(4), n_pcs=3, n_neighbors=15)
    assert neighbors.shape == (4, 3)
    assert all(set(row) == set(range(4)) - {i} for i, row in enumerate(neighbors))
    single, _, _ = graph.pca_neighbors(x, np.array([7]), n_pcs=3, n_neighbors=15)
    np.testing.assert_array_equal(single, [[0]])


def test_each_group_is_on_its_own_pca():
    x, cluster = blobs()
    rows = np.arange(x.shape[0])
    groups = cluster % 2  # two groups: clusters 0+2 and cluster 1
    pca = graph.study_pca(x, rows, groups, n_components=4)
    for g in (0, 1):
        own = randomized_pca(x, 4, seed=0, rows=rows[groups == g])
        np.testing.assert_allclose(pca[groups == g], own, rtol=1e-5, atol=1e-5)


def test_scaled_pca_finds_populations_that_a_few_high_variance_genes_hide():
    """Two populations differ in 5 genes of small variance; 40 genes of large variance
    carry only noise, and more of it in the second study. On the log data as is the
    graph mixes the populations; with every gene scaled (within each study) it does not."""
    rng = np.random.default_rng(0)
    n = 400
    population = np.arange(n) % 2
    study = (np.arange(n) // 2) % 2
    markers = population[:, None] * 1.0 + rng.normal(0, 0.3, (n, 5))
    noise = rng.normal(0, 5, (n, 40)) * (1 + study[:, None])
    x = sp.csr_matrix(np.hstack([markers, noise]).astype(np.float32))
    rows = np.arange(n)

    def purity(scaling):
        neighbors, _, _ = graph.pca_neighbors(
            x, rows, n_pcs=3, n_neighbors=10, groups=study, scaling=scaling
        )
        return (population[neighbors] == population[:, None]).mean()

    assert purity("none") < 0.65
    assert purity("all") > 0.9 and purity("study") > 0.9


def test_study_scaling_needs_the_studies():
    x, _ = blobs()
    with pytest.raises(ValueError, match="groups"):
        graph.pca_neighbors(x, np.arange(30), n_pcs=3, n_neighbors=5, scaling="study")
    with pytest.raises(ValueError, match="scaling must be"):
        graph.pca_neighbors(x, np.arange(30), n_pcs=3, n_neighbors=5, scaling="yes")
