"""End to end: composed configs → train(cfg) → the run's outputs → the reloaded model."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from scproto import ScProto, ScProtoInputError
from scproto.outputs import prototype_index
from scproto.train import CONFIG_DIR, train
from tests.conftest import N_EXPRESSED_GENES, SHARED_DATA, SMALL_SYNTHETIC, run_train_cli

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Stand-ins with each experiment's keys, for files these machines cannot download.
STAND_INS = {
    "immune_scib": ("study", "final_annotation", ["Freytag", "Villani", "Oetjen", "Sun"]),
    "pancreas_scib": ("tech", "celltype", ["celseq", "celseq2", "smartseq2", "inDrop1"]),
    "hlca": (
        "study",
        "ann_finest_level",
        ["Teichmann_Meyer_2019", "Lafyatis_Rojas_2019", "Krasnow_2020", "Banovich_Kropski_2020"],
    ),
    "cellbench": (
        "batch",
        "cell_type",
        ["CELseq2_5cl_p3", "CELseq2_5cl_p1", "CELseq2_5cl_p2", "Dropseq_3cl"],
    ),
}


def stand_in_file(small_adata, experiment: str, path: Path) -> Path:
    batch_key, label_key, studies = STAND_INS[experiment]
    adata = small_adata.copy()
    adata.obs[batch_key] = adata.obs["study"].cat.rename_categories(studies)
    adata.obs[label_key] = adata.obs["cell_type"]
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)  # X log-normalised, as in the scIB files
    adata.write_h5ad(path)
    return path


def test_run_writes_the_three_outputs(make_config, tmp_path):
    metrics, _ = train(make_config())
    run = tmp_path / "run"
    for name in ("checkpoints/last.ckpt", "embedding.h5ad", "prototypes.npy"):
        assert (run / name).is_file(), name
    embedding = ad.read_h5ad(run / "embedding.h5ad")
    assert embedding.n_obs == 1500  # reference and query cells
    assert {"study", "cell_type", "split", "prototype", "prototype_similarity"} <= set(
        embedding.obs
    )
    assert embedding.obsm["X_scproto"].shape == (1500, 8)
    assert set(embedding.obs["split"]) == {"reference", "query"}
    prototypes = np.load(run / "prototypes.npy")
    assert prototypes.shape == (20, 8)
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(metrics["train/loss"])
    for term in ("swav", "prop", "cvae", "recon", "kl"):
        assert f"train/loss_{term}" in metrics


def test_input_obs_columns_that_clash_are_kept(make_config, tmp_path, small_adata):
    path = tmp_path / "data.h5ad"
    adata = small_adata.copy()
    adata.obs["prototype"] = "from the user"
    adata.write_h5ad(path)
    _, objects = train(
        make_config("data=h5ad", f"data.path={path}", "data.query_studies=[study_3]")
    )
    obs = objects["embedding"].obs
    assert (obs["prototype_input"] == "from the user").all()
    assert isinstance(obs["prototype"].dtype, pd.CategoricalDtype)
    assert "split_input" not in obs  # same values as the run's split: nothing to keep


def test_same_seed_gives_the_identical_embedding(make_config, tmp_path):
    first = train(make_config(run_dir=tmp_path / "a"))[1]["embedding"]
    second = train(make_config(run_dir=tmp_path / "b"))[1]["embedding"]
    np.testing.assert_array_equal(first.obsm["X_scproto"], second.obsm["X_scproto"])
    np.testing.assert_array_equal(first.obs["prototype"], second.obs["prototype"])
    third = train(make_config("seed=5", run_dir=tmp_path / "c"))[1]["embedding"]
    assert not np.array_equal(first.obsm["X_scproto"], third.obsm["X_scproto"])


def test_save_load_gives_the_identical_embedding(make_config, tmp_path, small_adata):
    train(make_config())
    model = ScProto.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    written = ad.read_h5ad(tmp_path / "run" / "embedding.h5ad")
    np.testing.assert_array_equal(model.get_latent(small_adata), written.obsm["X_scproto"])
    prototype, similarity = model.assign_prototypes(small_adata)
    np.testing.assert_array_equal(prototype, prototype_index(written.obs["prototype"]))
    np.testing.assert_array_equal(similarity, written.obs["prototype_similarity"])
    np.testing.assert_array_equal(
        model.get_prototypes(), np.load(tmp_path / "run" / "prototypes.npy")
    )
    assert model.registry.studies == ["study_0", "study_1", "study_2", "study_3"]  # query mapped
    assert model.registry.reference_studies == ["study_0", "study_1", "study_2"]
    assert len(model.registry.input_spec.genes) == N_EXPRESSED_GENES
    assert model.registry.scproto_version


def test_reloaded_model_embeds_shuffled_genes_identically(make_config, tmp_path, small_adata):
    train(make_config())
    model = ScProto.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    order = np.random.default_rng(0).permutation(small_adata.n_vars)
    np.testing.assert_allclose(
        model.get_latent(small_adata[:, order].copy()),
        model.get_latent(small_adata),
        rtol=1e-5,
        atol=1e-6,
    )


def test_existing_outputs_are_not_overwritten_unless_asked(make_config, tmp_path, small_adata):
    run = tmp_path / "run"
    train(make_config())
    with pytest.raises(ScProtoInputError, match="already holds the outputs"):
        train(make_config())
    train(make_config("overwrite=true", "seed=3"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    model = ScProto.load(run / "checkpoints" / "last.ckpt")
    written = ad.read_h5ad(run / "embedding.h5ad")
    np.testing.assert_array_equal(model.get_latent(small_adata), written.obsm["X_scproto"])


def test_command_line_refuses_before_touching_the_run_directory(make_config, tmp_path):
    run = tmp_path / "run"
    train(make_config())
    record = run / ".hydra" / "config.yaml"
    record.parent.mkdir()
    record.write_text("the first run's record")
    result = subprocess.run(
        [sys.executable, "train.py", "debug=default", f"hydra.run.dir={run}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "already holds the outputs" in result.stderr and "Traceback" not in result.stderr
    assert record.read_text() == "the first run's record"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.likelihood=zinb", "model.likelihood=zinb"),
        ("data.neighbor_weighting=distanse", "data.neighbor_weighting=distanse"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("optimizer.name=sgd", "optimizer.name=sgd"),
    ],
)
def test_mistyped_settings_fail_before_the_data_is_read(make_config, override, message):
    with pytest.raises(ScProtoInputError, match=message):
        train(make_config(override))


def test_lightning_sets_the_sampler_epoch(make_config, monkeypatch):
    from scproto.data.views import ViewBatchSampler

    epochs = []
    original = ViewBatchSampler.set_epoch
    monkeypatch.setattr(
        ViewBatchSampler, "set_epoch", lambda self, e: (epochs.append(e), original(self, e))
    )
    overrides = ["trainer.max_epochs=3", "+trainer.reload_dataloaders_every_n_epochs=1"]
    train(make_config(*overrides, "query.epochs=0"))  # (query mapping draws views too)
    assert sorted(set(epochs)) == [0, 1, 2]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_fast_dev_run(
    experiment, make_config, tmp_path, small_adata
):
    overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true"]
    real = SHARED_DATA / "cellbench_5batch.h5ad"
    if experiment not in STAND_INS:  # generated data (synthetic_atlas), made small
        overrides += [*SMALL_SYNTHETIC, "data.n_top_genes=500"]
    elif not (experiment == "cellbench" and real.is_file()):
        overrides.append(
            f"data.path={stand_in_file(small_adata, experiment, tmp_path / 'data.h5ad')}"
        )
    metrics, objects = train(make_config(*overrides))
    assert np.isfinite(metrics["train/loss"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert objects["embedding"].obs["split"].eq("query").sum() > 0


@pytest.mark.parametrize("optimizer", ["lars", "adam"])
def test_frozen_prototypes_stay_put_during_training(make_config, monkeypatch, optimizer, tmp_path):
    import torch.nn.functional as F

    from scproto.model.module import ScProtoModule

    def record_start(self):
        self.start_prototypes = F.normalize(self.prototypes.detach().clone(), dim=1).numpy()

    monkeypatch.setattr(ScProtoModule, "on_train_start", record_start, raising=False)
    frozen = train(make_config("model.freeze_prototypes_iters=1000", f"optimizer={optimizer}"))[1]
    model = frozen["model"]
    np.testing.assert_allclose(model.get_prototypes(), model.module.start_prototypes, atol=1e-6)
    moving = train(make_config(f"optimizer={optimizer}", run_dir=tmp_path / "moving"))[1]["model"]
    assert not np.allclose(moving.get_prototypes(), moving.module.start_prototypes, atol=1e-4)


def test_ddp_on_two_cpu_processes_trains_and_rank_zero_writes_once(tmp_path):
    run = tmp_path / "ddp"
    done = run_train_cli(
        "debug=default",
        "trainer=ddp_cpu",
        "trainer.enable_progress_bar=false",
        "query.epochs=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    )
    assert "Starting with 2 processes" in done.stdout + done.stderr
    for name in ("checkpoints/last.ckpt", "embedding.h5ad", "metacells.h5ad", "metrics.json"):
        assert (run / name).is_file(), name
    assert "training took" in (run / "train.log").read_text()
    assert "training took" not in (run / "train_ddp_process_1.log").read_text()  # rank 1: fit only
    assert ScProto.load(run / "checkpoints/last.ckpt").get_prototypes().shape == (20, 8)


def test_the_paper_loss_makes_no_per_study_pca(make_config, small_adata):
    """loss=paper has no L_geometry, so preparing its data skips the per-study PCA."""
    from scproto.train import build_datamodule

    settings = ("data=h5ad", "data.batch_key=study", "data.n_top_genes=50")
    paper = build_datamodule(make_config("loss=paper", *settings), small_adata, inplace=False)
    default = build_datamodule(make_config(*settings), small_adata, inplace=False)
    assert paper.geometry_pcs == 0 and default.geometry_pcs == 10


def test_the_graphs_pca_scales_genes_within_each_study_unless_told_not_to(make_config, small_adata):
    """data.pca_scaling=study (the default) builds the graph on each gene scaled within its
    study; `none` is the PCA of the log data as it is. The registry keeps the setting for
    query mapping."""
    from scproto.data import graph
    from scproto.train import build_datamodule

    settings = ("data=h5ad", "data.batch_key=study", "data.n_top_genes=200")
    scaled = build_datamodule(make_config(*settings), small_adata, inplace=False)
    plain = build_datamodule(
        make_config(*settings, "data.pca_scaling=none"), small_adata, inplace=False
    )
    scaled.setup(), plain.setup()
    assert scaled.registry.view_settings["pca_scaling"] == "study"
    assert plain.registry.view_settings["pca_scaling"] == "none"
    rows = plain.train_index
    by_hand, _, _ = graph.pca_neighbors(
        plain.x, rows, n_pcs=plain.n_pcs, n_neighbors=15, seed=plain.seed
    )
    np.testing.assert_array_equal(plain.neighbors, by_hand)
    assert (scaled.neighbors != plain.neighbors).any()


def test_mnn_partners_join_each_cells_views_and_the_registry(make_config, small_adata):
    """data.mnn_neighbors widens every reference cell's neighbour list by data.mnn_slots
    columns, mostly cells of other studies; query mapping reads the same settings. On the
    unscaled PCA the study effect keeps a cell's plain neighbours in its own study."""
    from scproto.train import build_datamodule

    settings = (
        "data=h5ad",
        "data.batch_key=study",
        "data.n_top_genes=200",
        "data.pca_scaling=none",
    )
    plain = build_datamodule(make_config(*settings), small_adata, inplace=False)
    wider = build_datamodule(
        make_config(*settings, "data.mnn_neighbors=5", "data.mnn_slots=3"),
        small_adata,
        inplace=False,
    )
    plain.setup(), wider.setup()
    assert plain.neighbors.shape[1] == 15 and wider.neighbors.shape[1] == 18
    np.testing.assert_array_equal(wider.neighbors[:, :15], plain.neighbors)
    studies = wider.study_codes[wider.train_index]
    partners = wider.neighbors[:, 15:]
    assert (studies[partners] != studies[:, None]).all(axis=1).mean() > 0.5
    assert (studies[plain.neighbors] == studies[:, None]).mean() > 0.9  # the study effect
    assert wider.registry.view_settings["mnn_neighbors"] == 5
    assert wider.registry.view_settings["mnn_slots"] == 3


def test_the_paper_setting_is_one_override_away():
    """The defaults depart from the paper (L_geometry, 15 neighbours, the decoder's width,
    the assignment by decoding point, the scaled PCA of the graph); experiment=immune_scib restores them, as composed for `python train.py` (no test
    shrinking, which would set the neighbours itself)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        default = compose(config_name="train")
        paper = compose(config_name="train", overrides=["experiment=immune_scib"])
    assert (default.data.n_neighbors, default.loss.lambda_geometry) == (15, 5.0)
    assert (paper.data.n_neighbors, paper.loss.lambda_geometry) == (50, 0.0)
    assert (default.model.decoder_hidden_dim, paper.model.decoder_hidden_dim) == (128, None)
    assert (default.model.assignment, paper.model.assignment) == ("point", "cosine")
    assert (default.data.pca_scaling, paper.data.pca_scaling) == ("study", "none")
