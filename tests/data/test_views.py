import numpy as np
import pytest
import scipy.sparse as sp

from scproto.data.views import ViewBatchSampler, ViewRows, neighbor_probabilities, sample_views

K = 5


def graph(n=100, k=K):
    neighbors = (np.arange(n)[:, None] + np.arange(1, k + 1)[None]) % n
    distances = np.tile(np.arange(1, k + 1, dtype=np.float32), (n, 1))
    return neighbors, distances


def column_frequencies(probabilities, draws=20_000, seed=0):
    neighbors, _ = graph()
    anchors = np.zeros(draws, dtype=np.int64)
    views = sample_views(anchors, neighbors, 2, np.random.default_rng(seed), probabilities)
    return np.bincount(views[1] - 1, minlength=K) / draws  # neighbour j of cell 0 is cell j+1


def test_view_zero_is_the_anchor_and_the_rest_are_its_neighbours():
    neighbors, _ = graph()
    anchors = np.array([3, 50, 99])
    views = sample_views(anchors, neighbors, 8, np.random.default_rng(0))
    assert views.shape == (8, 3)
    np.testing.assert_array_equal(views[0], anchors)
    for i, anchor in enumerate(anchors):
        assert set(views[1:, i]) <= set(neighbors[anchor])


def test_uniform_draw_is_uniform_over_the_neighbour_list():
    np.testing.assert_allclose(column_frequencies(None), np.full(K, 1 / K), atol=0.015)


def test_distance_weighting_draws_proportional_to_squared_distance():
    _, distances = graph()
    probabilities = neighbor_probabilities(distances, "distance")
    expected = np.arange(1, K + 1) / np.arange(1, K + 1).sum()
    np.testing.assert_allclose(column_frequencies(probabilities), expected, atol=0.015)


def test_distance_weighting_with_only_duplicates_falls_back_to_uniform():
    probabilities = neighbor_probabilities(np.zeros((2, 4)), "distance")
    np.testing.assert_allclose(probabilities, 0.25)


def test_each_epoch_uses_cells_at_most_once_as_anchor_and_reshuffles():
    neighbors, _ = graph(n=103)
    sampler = ViewBatchSampler(neighbors, batch_size=20, n_views=3, seed=7)
    epochs = [list(sampler) for _ in range(2)]
    assert len(sampler) == len(epochs[0]) == 5  # the partial sixth minibatch is dropped
    for batches in epochs:
        anchors = np.concatenate([b.reshape(3, -1)[0] for b in batches])
        assert len(np.unique(anchors)) == len(anchors) == 100
    assert not np.array_equal(epochs[0][0], epochs[1][0])


def test_a_single_partial_minibatch_is_kept():
    neighbors, _ = graph(n=30)
    batches = list(ViewBatchSampler(neighbors, batch_size=64, n_views=2, seed=0))
    assert len(batches) == 1 and batches[0].size == 60


def test_set_epoch_fixes_the_stream_of_an_epoch():
    neighbors, _ = graph()
    sampler = ViewBatchSampler(neighbors, batch_size=32, n_views=4, seed=1)
    first_epoch_two = (sampler.set_epoch(2), list(sampler))[1]
    sampler.set_epoch(2)
    for a, b in zip(first_epoch_two, list(sampler), strict=True):
        np.testing.assert_array_equal(a, b)
    sampler.set_epoch(3)
    assert not np.array_equal(first_epoch_two[0], next(iter(sampler)))


def test_sampler_repeats_with_the_same_seed():
    neighbors, _ = graph()
    first = list(ViewBatchSampler(neighbors, batch_size=32, n_views=4, seed=1))
    second = list(ViewBatchSampler(neighbors, batch_size=32, n_views=4, seed=1))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_rows_are_densified_per_minibatch_only():
    matrix = sp.random(10, 4, density=0.5, format="csr", random_state=0, dtype=np.float32)
    rows = ViewRows(matrix, np.arange(10) % 2)
    batch = rows.__getitems__(np.array([3, 3, 7]))
    np.testing.assert_array_equal(batch["x"].numpy(), matrix[[3, 3, 7]].toarray())
    assert batch["study"].tolist() == [1, 1, 1]
    assert sp.issparse(rows.x)


def test_rows_of_a_subset_map_to_the_full_matrix_without_copying_it():
    matrix = sp.random(10, 4, density=0.5, format="csr", random_state=0, dtype=np.float32)
    rows = ViewRows(matrix, np.arange(10), cells=np.array([2, 5, 9]))
    assert len(rows) == 3 and rows.x is matrix
    batch = rows.__getitems__(np.array([0, 2]))
    np.testing.assert_array_equal(batch["x"].numpy(), matrix[[2, 9]].toarray())
    assert batch["study"].tolist() == [2, 9]


def test_pca_rows_follow_the_items_not_the_matrix_rows():
    """The PCA coordinates have one row per training cell (item), not per matrix row."""
    matrix = sp.random(10, 4, density=0.5, format="csr", random_state=0, dtype=np.float32)
    pca = np.arange(6, dtype=np.float32).reshape(3, 2)
    rows = ViewRows(matrix, np.arange(10), cells=np.array([2, 5, 9]), pca=pca)
    np.testing.assert_array_equal(rows.__getitems__(np.array([2, 0]))["pca"].numpy(), pca[[2, 0]])


def test_ranks_split_each_global_minibatch_into_contiguous_shares():
    """Under DDP every rank draws the same global minibatch and keeps its share of anchors:
    the shares, side by side in rank order, are exactly the minibatch of one process."""
    neighbors, _ = graph()
    n_views, batch_size = 3, 20

    def batches(rank=0, world_size=1):
        sampler = ViewBatchSampler(
            neighbors,
            batch_size=batch_size,
            n_views=n_views,
            seed=4,
            rank=rank,
            world_size=world_size,
        )
        sampler.set_epoch(2)
        return [b.reshape(n_views, -1) for b in sampler]

    single = batches()
    shards = [batches(rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 5
    for whole, first, second in zip(single, *shards, strict=True):
        assert first.shape == second.shape == (n_views, batch_size // 2)
        np.testing.assert_array_equal(np.concatenate([first, second], axis=1), whole)


def test_a_rank_outside_the_world_is_refused():
    neighbors, _ = graph()
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ViewBatchSampler(neighbors, batch_size=8, n_views=2, seed=0, rank=2, world_size=2)
