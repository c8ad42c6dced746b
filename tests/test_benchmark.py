"""Table 1's harness: shared inputs, scores, the summary table, and a run on tiny data."""

import importlib.util

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from scproto.benchmark.harness import knn_f1, prepare, run_benchmark, summary_table
from scproto.errors import ScProtoInputError
from scproto.train import CONFIG_DIR
from tests.conftest import SMALL_SYNTHETIC


def benchmark_config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="benchmark",
            overrides=[
                "debug=default",
                *SMALL_SYNTHETIC,
                "trainer.enable_progress_bar=false",
                "query.epochs=5",
                "benchmark.seeds=[0]",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "bench")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_prepare_chooses_the_genes_on_the_reference_and_keeps_counts(small_adata):
    prepared, everything = prepare(
        small_adata,
        batch_key="study",
        counts_layer=None,
        query_studies=["study_3"],
        n_top_genes=100,
    )
    assert prepared.n_vars == 100 and everything.n_vars == small_adata.n_vars
    assert set(prepared.obs["split"]) == {"reference", "query"}
    assert (prepared.obs.loc[prepared.obs["split"] == "query", "study"] == "study_3").all()
    counts = prepared.layers["counts"].toarray()
    np.testing.assert_array_equal(counts, np.round(counts))
    assert prepared.X.max() < 15  # log-normalised


def test_prepare_refuses_data_without_counts(small_adata):
    logged = small_adata.copy()
    logged.X = np.log1p(logged.X.toarray() * 0.37)
    with pytest.raises(ScProtoInputError, match="need raw counts"):
        prepare(logged, batch_key="study", counts_layer=None, query_studies=[], n_top_genes=100)


def test_knn_label_transfer_scores_the_query_only():
    rng = np.random.default_rng(0)
    labels = pd.Series(np.repeat(["a", "b"], 50))
    latent = np.where(labels.to_numpy()[:, None] == "a", 0.0, 10.0) + rng.normal(size=(100, 2))
    is_reference = np.tile([True, False], 50)
    assert knn_f1(latent, labels, is_reference, k=15) == 1.0
    assert np.isnan(knn_f1(latent, labels, np.ones(100, bool), k=15))


def test_summary_table_gives_mean_and_spread_and_bolds_the_best():
    table = pd.DataFrame(
        {
            "method": ["pca", "pca", "scproto", "scproto"],
            "seed": [0, 1, 0, 1],
            "epochs": ["-", "-", "60 + 100", "60 + 100"],
            "scib/total": [0.40, 0.42, 0.70, 0.74],
            "time/train_s": [1.0, 1.0, 80.0, 90.0],
        }
    )
    text = summary_table(table)
    assert "| scproto | 2 | 60 + 100 | **0.720 ± 0.028** | 85.0 ± 7.1 |" in text
    assert "| pca | 2 | - | 0.410 ± 0.014 | **1.0 ± 0.0** |" in text


def test_unknown_methods_are_named(tmp_path):
    with pytest.raises(ScProtoInputError, match=r"'umap'.*unknown"):
        run_benchmark(benchmark_config(tmp_path, "benchmark.methods=[pca,umap]"), tmp_path / "b")


def test_pca_and_scproto_on_tiny_data_write_table_1(tmp_path):
    cfg = benchmark_config(tmp_path, "benchmark.methods=[pca,scproto]")
    out = tmp_path / "bench"
    table = run_benchmark(cfg, out)
    assert list(table["method"]) == ["pca", "scproto"]
    for column in ("scib/total", "scgraph/corr_weighted", "labels/knn_f1_macro", "time/train_s"):
        assert table[column].notna().all(), column
    scproto = table.loc[table["method"] == "scproto"].iloc[0]
    assert np.isfinite(scproto["labels/prototype_f1_macro"])
    # scProto's own outputs are scored from its run: coverage and metacell vs single-cell markers
    assert 0 < scproto["coverage/prototypes_in_use_share"] <= 1
    assert scproto["coverage/types_without_non_empty_prototype"] >= 0
    for feature in ("single_cell", "metacell"):
        assert 0 <= scproto[f"markers/cd4_vs_cd8/{feature}/f1_macro"] <= 1
    assert table.loc[table["method"] == "pca", "coverage/prototypes_in_use_share"].isna().all()
    for name in ("table.csv", "table.md", "table.png", "pca/seed_0.npy", "scproto/seed_0.npy"):
        assert (out / name).is_file(), name
    assert np.load(out / "scproto" / "seed_0.npy").shape == (1500, 8)
    text = (out / "table.md").read_text()
    assert "| scproto | 1 | 2 + 5 |" in text and "markers/cd4_vs_cd8/metacell/f1_macro" in text
    assert "Machine: " in text and "1500 cells" in text


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("scvi", "scarches", "harmonypy")),
    reason="needs the benchmark extra: pip install -e '.[benchmark]'",
)
def test_every_baseline_runs_on_tiny_data(tmp_path):
    methods = "benchmark.methods=[harmony,scvi,scvi_arches,scpoli]"
    cfg = benchmark_config(
        tmp_path, methods, "benchmark.max_epochs.scvi=3", "benchmark.max_epochs.scvi_arches=3"
    )
    with open_dict(cfg):
        cfg.benchmark.max_epochs.scpoli = 3
    table = run_benchmark(cfg, tmp_path / "bench")
    assert set(table["method"]) == {"harmony", "scvi", "scvi_arches", "scpoli"}
    assert table["scib/total"].notna().all()


def test_a_spawned_worker_reports_its_own_peak_memory_not_its_parents():
    import multiprocessing

    from scproto.benchmark.harness import peak_rss_mb

    ballast = np.ones(400 * 2**20 // 8)  # 400 MB held by this (the parent) process
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(peak_rss_mb)
    assert 0 < child < peak_rss_mb() - 300
    del ballast


def test_parts_built_separately_merge_into_one_table_with_each_parts_footer(tmp_path):
    from scproto.benchmark.harness import merge_parts, write_tables

    for name, method, total in (("a", "pca", 0.4), ("b", "scproto", 0.7)):
        part = pd.DataFrame(
            {"method": [method] * 2, "seed": [0, 1], "epochs": ["-"] * 2, "scib/total": [total] * 2}
        )
        write_tables(part, tmp_path / name, "part", footer=f"Machine: part {name}.")
    table = merge_parts([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "all")
    assert list(table["method"]) == ["pca", "pca", "scproto", "scproto"]
    text = (tmp_path / "all" / "table.md").read_text()
    assert "| scproto | 2 | - | **0.700 ± 0.000** |" in text
    assert "Part 1 (pca): Machine: part a." in text and "Part 2 (scproto): Machine: part b." in text
    with pytest.raises(ScProtoInputError, match="nothing to do"):
        merge_parts([], tmp_path / "none")
