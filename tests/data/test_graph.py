import numpy as np
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
