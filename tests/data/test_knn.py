import numpy as np
import pytest
import scipy.sparse as sp

from scproto.data import knn


def duplicated_points(n_unique=30, copies=4, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.normal(size=(n_unique, dim)), copies, axis=0).astype(np.float32)


@pytest.mark.parametrize("kind", ["exact", "ivf_flat", "ivf_pq"])
def test_a_cell_is_never_its_own_neighbour_even_with_duplicates(kind):
    points = duplicated_points()
    neighbors, distances, _ = knn.knn_graph(points, 10, kind=kind, nprobe=64)
    n = len(points)
    assert neighbors.shape == distances.shape == (n, 10)
    assert not (neighbors == np.arange(n)[:, None]).any()
    assert all(len(set(row)) == 10 for row in neighbors)
    # the three twins of each cell come first, at distance 0
    twins = np.sort(neighbors[:, :3], axis=1)
    expected = np.array([sorted(set(range(i // 4 * 4, i // 4 * 4 + 4)) - {i}) for i in range(n)])
    np.testing.assert_array_equal(twins, expected)
    np.testing.assert_allclose(distances[:, :3], 0, atol=1e-5)


def test_drop_self_when_the_search_left_the_cell_out():
    neighbors = np.array([[5, 6, 7], [1, 2, 3]])  # row 0 lost itself among ties, row 1 found itself
    distances = np.array([[0.0, 0.0, 1.0], [0.0, 0.5, 0.7]])
    kept, kept_distances = knn.drop_self(neighbors, distances)
    np.testing.assert_array_equal(kept, [[5, 6], [2, 3]])
    np.testing.assert_array_equal(kept_distances, [[0.0, 0.0], [0.5, 0.7]])


def test_exact_graph_matches_brute_force():
    points = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    neighbors, distances, recall = knn.knn_graph(points, 5)
    assert recall == 1.0
    squared = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    np.testing.assert_array_equal(neighbors, np.argsort(squared, axis=1)[:, :5])
    np.testing.assert_allclose(distances, np.sort(squared, axis=1)[:, :5], rtol=1e-4)


def test_cache_key_changes_with_data_and_settings_and_round_trips(tmp_path):
    matrix = sp.random(50, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    rows = np.arange(40)
    key = knn.data_fingerprint(matrix, rows, {"k": 5})
    assert key == knn.data_fingerprint(matrix.copy(), rows.copy(), {"k": 5})
    assert key != knn.data_fingerprint(matrix, rows, {"k": 6})
    assert key != knn.data_fingerprint(matrix, np.arange(41), {"k": 5})
    changed = matrix.copy()
    changed.data[0] += 1
    assert key != knn.data_fingerprint(changed, rows, {"k": 5})

    assert knn.load_cached(tmp_path, key) is None
    neighbors, distances = np.arange(10).reshape(5, 2), np.ones((5, 2), np.float32)
    knn.save_cached(tmp_path, key, neighbors, distances, 0.97)
    loaded = knn.load_cached(tmp_path, key)
    np.testing.assert_array_equal(loaded[0], neighbors)
    np.testing.assert_array_equal(loaded[1], distances)
    assert loaded[2] == pytest.approx(0.97)


def clusters(n=6000, dim=20, seed=2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4, size=(30, dim))
    return (centres[rng.integers(0, 30, n)] + rng.normal(size=(n, dim))).astype(np.float32)


START = {"ivf_flat": 4, "ivf_pq": 1}  # nprobe: lists of ~19 and ~78 cells


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
@pytest.mark.parametrize("min_recall", [0.0, 0.97])
def test_approximate_recall_is_measured_and_nprobe_raised_to_reach_the_target(kind, min_recall):
    points = clusters()
    neighbors, _, recall = knn.knn_graph(
        points, 15, kind=kind, nprobe=START[kind], min_recall=min_recall
    )
    # the reported recall is that of the graph itself: recompute it on every row
    exact, _, _ = knn.knn_graph(points, 15)
    truth = np.mean([np.intersect1d(a, b).size / 15 for a, b in zip(neighbors, exact, strict=True)])
    assert abs(recall - truth) < 0.03
    if min_recall:
        assert recall >= min_recall
    else:
        assert recall < 0.95  # a few lists per cell: a poorer graph, reported as such


def test_auto_is_exact_up_to_the_threshold_then_ivf_pq():
    assert knn.index_kind("auto", 200_000, 200_000) == "exact"
    assert knn.index_kind("auto", 200_001, 200_000) == "ivf_pq"
    assert knn.index_kind("auto", 10**7, None) == "exact"
    assert knn.index_kind("ivf_flat", 10, 200_000) == "ivf_flat"
    with pytest.raises(knn.ScProtoInputError, match=r"data\.knn_index must be one of"):
        knn.index_kind("hnsw", 10, None)


def test_neighbourhood_means_shrink_the_spread_within_clusters_and_keep_their_centres():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 1200)
    centres = rng.normal(scale=10, size=(6, 5))
    x = (centres[labels] + rng.normal(size=(1200, 5))).astype(np.float32)
    smoothed = knn.neighbourhood_means(x, 10)
    for group in range(6):
        members = labels == group
        np.testing.assert_allclose(smoothed[members].mean(0), x[members].mean(0), atol=0.1)
        assert smoothed[members].std(0).mean() < 0.75 * x[members].std(0).mean()
    # k = 0: every row is its own mean
    np.testing.assert_allclose(knn.neighbourhood_means(x[:50], 0), x[:50])


def brute_force_mutual(points, groups, k):
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    far = ((unit[:, None] - unit[None]) ** 2).sum(-1)
    nearest = {}
    for i in range(len(points)):
        for g in np.unique(groups):
            into = np.flatnonzero(groups == g)
            nearest[i, g] = set(into[np.argsort(far[i, into], kind="stable")[:k]])
    return {
        (i, j)
        for i in range(len(points))
        for j in range(len(points))
        if groups[i] != groups[j] and j in nearest[i, groups[j]] and i in nearest[j, groups[i]]
    }


def test_mutual_neighbors_are_the_brute_force_pairs_across_groups_only():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(90, 6)).astype(np.float32)
    groups = rng.integers(0, 3, size=90)
    partners = knn.mutual_neighbors(points, groups, 4)
    found = set(zip(*partners.nonzero(), strict=True))
    assert found == brute_force_mutual(points, groups, 4)
    assert (partners != partners.T).nnz == 0  # symmetric
    assert all(groups[i] != groups[j] for i, j in found)


def test_mutual_neighbors_match_a_shifted_copy_of_each_cluster_by_direction():
    # two studies of the same three populations, the second scaled out and shifted a little:
    # its cells' own neighbours stay in it, but the partners are the same population's
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8, dtype=np.float32) * 10
    labels = np.repeat(np.arange(3), 20)
    first = centres[labels] + rng.normal(scale=0.5, size=(60, 8))
    second = 3 * (centres[labels] + rng.normal(scale=0.5, size=(60, 8))) + 1.0
    points = np.vstack([first, second]).astype(np.float32)
    groups, kinds = np.repeat([0, 1], 60), np.tile(labels, 2)
    i, j = knn.mutual_neighbors(points, groups, 5).nonzero()
    assert len(i) > 60
    assert (kinds[i] == kinds[j]).all()


def test_with_partners_draws_the_new_columns_from_partners_or_the_own_list():
    neighbors = np.array([[1, 2], [0, 2], [0, 1], [2, 1]])
    distances = np.ones((4, 2), dtype=np.float32)
    coordinates = np.arange(8, dtype=np.float32).reshape(4, 2)
    partners = sp.csr_matrix(
        (np.ones(2, dtype=bool), ([0, 3], [3, 0])), shape=(4, 4)
    )  # only cells 0 and 3 have a partner (each other)
    wider, wider_distances = knn.with_partners(neighbors, distances, coordinates, partners, 3)
    assert wider.shape == wider_distances.shape == (4, 5)
    np.testing.assert_array_equal(wider[:, :2], neighbors)
    np.testing.assert_array_equal(wider[[0, 3], 2:], [[3, 3, 3], [0, 0, 0]])
    for row in (1, 2):
        assert set(wider[row, 2:]) <= set(neighbors[row])
    gap = coordinates[wider[:, 2:]] - coordinates[:, None]
    np.testing.assert_allclose(wider_distances[:, 2:], (gap**2).sum(-1))


def test_mutual_neighbors_in_blocks_of_rows_equal_one_block(monkeypatch):
    rng = np.random.default_rng(5)
    points = rng.normal(size=(120, 6)).astype(np.float32)
    groups = rng.integers(0, 3, size=120)
    whole = knn.mutual_neighbors(points, groups, 5)
    monkeypatch.setattr(knn, "SEARCH_BLOCK_ROWS", 7)
    assert (knn.mutual_neighbors(points, groups, 5) != whole).nnz == 0
