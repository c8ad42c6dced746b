import numpy as np
import pytest
import scipy.sparse as sp

from scproto.data import knn


def duplicated_points(n_unique=30, copies=4, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.normal(size=(n_unique, dim)), copies, axis=0).astype(np.float32)


@pytest.mark.parametrize("approximate", [False, True])
def test_a_cell_is_never_its_own_neighbour_even_with_duplicates(approximate):
    points = duplicated_points()
    neighbors, distances = knn.knn_graph(points, 10, approximate=approximate, nprobe=64)
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
    neighbors, distances = knn.knn_graph(points, 5)
    squared = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(squared, np.inf)
    np.testing.assert_array_equal(neighbors, np.argsort(squared, axis=1)[:, :5])
    np.testing.assert_allclose(distances, np.sort(squared, axis=1)[:, :5], rtol=1e-4)


def test_cache_key_changes_with_data_and_settings_and_round_trips(tmp_path):
    matrix = sp.random(50, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    key = knn.data_fingerprint(matrix, {"k": 5})
    assert key == knn.data_fingerprint(matrix.copy(), {"k": 5})
    assert key != knn.data_fingerprint(matrix, {"k": 6})
    changed = matrix.copy()
    changed.data[0] += 1
    assert key != knn.data_fingerprint(changed, {"k": 5})

    assert knn.load_cached(tmp_path, key) is None
    neighbors, distances = np.arange(10).reshape(5, 2), np.ones((5, 2), np.float32)
    knn.save_cached(tmp_path, key, neighbors, distances)
    loaded = knn.load_cached(tmp_path, key)
    np.testing.assert_array_equal(loaded[0], neighbors)
    np.testing.assert_array_equal(loaded[1], distances)
