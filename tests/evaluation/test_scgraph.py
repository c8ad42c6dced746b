"""scGraph: the project's pure functions against the reference package, and by hand."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from scproto.datasets.synthetic import make_synthetic
from scproto.evaluation.scgraph import (
    batch_reference,
    column_scores,
    consensus,
    normalized_distances,
    scgraph_scores,
    trimmed_centroids,
    weighted_pearson,
)

with warnings.catch_warnings():  # scgraph-eval silences every warning at import
    scgraph_eval = pytest.importorskip("scgraph")


@pytest.fixture(scope="module")
def log_expression():
    """Log-normalised synthetic data (more genes than the 1,000 HVGs per batch) with three
    embeddings of different quality."""
    adata = make_synthetic(n_cells=1500, n_genes=1500, seed=0)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=20)
    rng = np.random.default_rng(0)
    adata.obsm["X_good"] = adata.obsm["X_pca"][:, :10]
    adata.obsm["X_noisy"] = adata.obsm["X_good"] + rng.normal(0, 3, (adata.n_obs, 10))
    adata.obsm["X_random"] = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    return adata


def reference_scores(adata, path, embeddings) -> pd.DataFrame:
    for_reference = adata.copy()
    for_reference.obsm = {key: adata.obsm[key] for key in embeddings}
    for_reference.write_h5ad(path)
    with warnings.catch_warnings():
        evaluator = scgraph_eval.scGraph(str(path), "study", "cell_type", only_umap=False)
        return evaluator.main(list(embeddings))


def ours(adata, embeddings, **kwargs) -> pd.DataFrame:
    reference = batch_reference(adata, "study", "cell_type", **kwargs)
    arrays = {key: adata.obsm[key] for key in embeddings}
    return scgraph_scores(arrays, adata.obs["cell_type"], reference)


def test_matches_scgraph_eval(log_expression, tmp_path):
    embeddings = ["X_good", "X_noisy", "X_random"]
    expected = reference_scores(log_expression, tmp_path / "a.h5ad", embeddings)
    got = ours(log_expression, embeddings)
    np.testing.assert_allclose(
        got.to_numpy(dtype=float), expected.to_numpy(dtype=float), atol=1e-6, rtol=0
    )
    # and the scores rank the embeddings as intended
    assert got.loc["X_good", "corr_weighted"] > got.loc["X_noisy", "corr_weighted"]
    assert got.loc["X_noisy", "corr_weighted"] > got.loc["X_random", "corr_weighted"]


def test_rare_type_and_small_batch_match_scgraph_eval(log_expression, tmp_path):
    """A type under 10 cells is ignored and a batch under 100 cells skipped, as in the
    reference; here study_1 is cut to 60 cells so it is skipped."""
    adata = log_expression
    keep = np.ones(adata.n_obs, bool)
    in_study_1 = np.flatnonzero(adata.obs["study"] == "study_1")
    keep[in_study_1[60:]] = False
    adata = adata[keep].copy()
    counts = adata.obs["cell_type"].value_counts()
    assert counts.min() < 10  # the megakaryocytes
    expected = reference_scores(adata, tmp_path / "b.h5ad", ["X_good"])
    got = ours(adata, ["X_good"])
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), atol=1e-6)


def test_type_only_in_skipped_batches_is_left_out(log_expression, tmp_path):
    """The reference raises a KeyError here; we score the other types exactly as the
    reference does on the data without the unscorable type's cells."""
    adata = log_expression.copy()
    rng = np.random.default_rng(1)
    small = adata.obs_names[adata.obs["study"] == "study_1"][:60]
    adata.obs["study"] = adata.obs["study"].astype(str)
    adata.obs.loc[small, "study"] = "tiny"  # < 100 cells: skipped
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    only_there = small[rng.permutation(60)[:15]]
    adata.obs.loc[only_there, "cell_type"] = "orphan"  # 15 cells, all in the skipped batch
    with pytest.raises(KeyError):
        reference_scores(adata, tmp_path / "c.h5ad", ["X_good"])
    got = ours(adata, ["X_good"])
    without = adata[adata.obs["cell_type"] != "orphan"].copy()
    expected = reference_scores(without, tmp_path / "d.h5ad", ["X_good"])
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), atol=1e-6)


def test_trimmed_centroid_ignores_outliers():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0], [1000.0]])
    centroids = trimmed_centroids(x, ["a"] * 10, trim=0.1)
    assert centroids.loc["a", 0] == pytest.approx(4.5)  # 0 and 1000 cut
    assert trimmed_centroids(x, ["a"] * 10, trim=0.0).loc["a", 0] == pytest.approx(103.6)


def test_normalized_distances_columns_peak_at_one():
    centroids = pd.DataFrame([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], index=["a", "b", "c"])
    distances = normalized_distances(centroids)
    np.testing.assert_allclose(distances.max(axis=0), 1.0)
    assert distances.loc["b", "a"] == pytest.approx(0.5)
    assert distances.loc["a", "b"] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diag(distances), 0.0)


def test_consensus_ignores_missing_pairs():
    first = pd.DataFrame([[0, 1.0], [1.0, 0]], index=["a", "b"], columns=["a", "b"])
    second = pd.DataFrame([[0, 0.5], [0.5, 0]], index=["b", "c"], columns=["b", "c"])
    merged = consensus([first, second])
    assert list(merged.columns) == ["a", "b", "c"] and list(merged.index) == ["a", "b", "c"]
    assert np.isnan(merged.loc["a", "c"])  # in no batch together
    assert merged.loc["b", "c"] == pytest.approx(1.0)  # column c's largest value, 0.5 → 1
    assert merged.loc["c", "b"] == pytest.approx(0.5)  # column b's largest is a's 1.0
    np.testing.assert_allclose(merged.max(axis=0), 1.0)


def test_weighted_pearson_hand_cases():
    distance = np.array([0.0, 1.0, 2.0, 4.0])
    # a perfect linear relation is 1 whatever the weights; its mirror is −1
    assert weighted_pearson(2 * distance + 1, distance, distance) == pytest.approx(1.0)
    assert weighted_pearson(-distance, distance, distance) == pytest.approx(-1.0)
    # weights 1, 1/2, 1/4 (self pair 0) normalised to 4/7, 2/7, 1/7, by hand:
    x, y = np.array([9.0, 1.0, 2.0, 0.0]), np.array([0.0, 1.0, 0.0, 1.0])
    w = np.array([0, 4, 2, 1]) / 7
    mx, my = w @ x, w @ y
    expected = (w @ ((x - mx) * (y - my))) / np.sqrt((w @ (x - mx) ** 2) * (w @ (y - my) ** 2))
    assert weighted_pearson(x, y, distance) == pytest.approx(expected)
    assert expected == pytest.approx(-6 / np.sqrt(50))  # −84 / √(140 · 70), in 343rds
    # the self pair's value does not matter: its weight is 0
    assert weighted_pearson(np.r_[-50.0, x[1:]], y, distance) == pytest.approx(expected)


def test_column_scores_include_the_self_pair_except_weighted():
    reference = pd.DataFrame(
        [[0, 1.0, 0.5], [1.0, 0, 1.0], [0.5, 0.8, 0]], index=list("abc"), columns=list("abc")
    )
    scores = column_scores(reference, reference)
    np.testing.assert_allclose(scores.to_numpy(), 1.0)
    swapped = reference.copy()
    swapped.loc[["b", "c"], "a"] = [0.5, 1.0]  # b and c swap places around a
    column_a = column_scores(swapped, reference).loc["a"]
    # with the self pair (0) the ranks still agree on a being nearest itself
    assert column_a["rank_pca"] == pytest.approx(0.5)
    # without the self pair only the swapped two remain: perfectly anti-correlated
    assert column_a["corr_weighted"] == pytest.approx(-1.0)
