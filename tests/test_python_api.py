"""The scvi-tools-shaped door: setup_anndata → ScProto(adata, ...) → train → outputs."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import scproto
from scproto import ScProto, ScProtoInputError
from scproto.train import train

# The shrunk settings of tests/conftest.py FAST, as keywords and as overrides.
KEYWORDS = dict(n_top_genes=500, n_neighbors=15, n_prototypes=20)
OVERRIDES = [f"data.{k}={v}" for k, v in KEYWORDS.items() if k != "n_prototypes"]


@pytest.fixture(scope="module")
def reference(small_adata):
    """The reference studies of small_adata, log-normalised in X, counts in a layer."""
    adata = small_adata[small_adata.obs["split"] == "reference"].copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def trained(reference):
    adata = reference.copy()
    ScProto.setup_anndata(adata, batch_key="study", labels_key="cell_type", layer="counts")
    model = ScProto(adata, **KEYWORDS)
    return model.train(max_epochs=2, batch_size=128, progress_bar=False)


def test_train_py_and_the_python_object_give_the_same_embedding(make_config, reference, tmp_path):
    path = tmp_path / "reference.h5ad"
    reference.write_h5ad(path)
    cfg = make_config(
        "data=h5ad",
        f"data.path={path}",
        "data.label_key=cell_type",
        "data.layer=counts",
        "data.query_studies=[]",
        *OVERRIDES,
    )
    train(cfg)
    from_cli = ad.read_h5ad(tmp_path / "run" / "embedding.h5ad").obsm["X_scproto"]

    adata = reference.copy()
    ScProto.setup_anndata(adata, batch_key="study", labels_key="cell_type", layer="counts")
    model = ScProto(adata, **KEYWORDS).train(max_epochs=2, batch_size=128, progress_bar=False)
    np.testing.assert_array_equal(model.get_latent_representation(), from_cli)


def test_the_users_anndata_is_left_as_it_was(reference, trained):
    np.testing.assert_array_equal(trained.adata.X.data, reference.X.data)
    assert (trained.adata.layers["counts"] != reference.layers["counts"]).nnz == 0


def test_a_counts_layer_model_reads_the_layer_of_new_data(trained, small_adata):
    query = small_adata[small_adata.obs["split"] == "query"].copy()
    query.layers["counts"] = query.X.copy()
    sc.pp.normalize_total(query)
    sc.pp.log1p(query)
    latent = trained.get_latent_representation(query)
    assert latent.shape == (query.n_obs, 8)
    with pytest.raises(ScProtoInputError, match="looks like log data"):
        trained.get_latent_representation(query, layer="X")
    del query.layers["counts"]
    with pytest.raises(ScProtoInputError, match=r"layers\['counts'\], which this AnnData lacks"):
        trained.get_latent_representation(query)


def test_denoised_expression_removes_the_study(trained):
    own = trained.get_normalized_expression()
    assert own.shape == (trained.adata.n_obs, len(trained.spec.genes))
    assert list(own.index) == list(trained.adata.obs_names)
    assert (own.to_numpy() >= 0).all()
    as_one = trained.get_normalized_expression(transform_batch="study_0", return_numpy=True)
    in_study_0 = (trained.adata.obs["study"] == "study_0").to_numpy()
    np.testing.assert_allclose(as_one[in_study_0], own.to_numpy()[in_study_0], rtol=1e-5)
    assert not np.allclose(as_one[~in_study_0], own.to_numpy()[~in_study_0])
    with pytest.raises(ScProtoInputError, match="not a study of this model"):
        trained.get_normalized_expression(transform_batch="study_9")


def test_metacells_and_labels_come_with_training(trained):
    metacells = trained.get_metacells()
    assert metacells.n_obs == 20
    assert "label_assigned" in metacells.obs
    assert len(trained.registry.prototype_labels) == 20
    assert "predicted_label" in trained.predict_labels(trained.adata)


def test_save_and_load_with_the_anndata_attached(trained, tmp_path):
    trained.save(tmp_path / "model/")
    loaded = ScProto.load(tmp_path / "model", adata=trained.adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    assert "20 prototypes" in repr(loaded) and "layers['counts']" in repr(loaded)


def test_mistakes_are_named(reference):
    adata = reference.copy()
    with pytest.raises(ScProtoInputError, match="setup_anndata"):
        ScProto(adata)
    with pytest.raises(ScProtoInputError, match="'studies' is not an obs column"):
        ScProto.setup_anndata(adata, batch_key="studies")
    with pytest.raises(ScProtoInputError, match="layer='spliced'"):
        ScProto.setup_anndata(adata, batch_key="study", layer="spliced")
    ScProto.setup_anndata(adata, batch_key="study")
    with pytest.raises(ScProtoInputError, match="Did you mean 'n_prototypes'"):
        ScProto(adata, n_protoypes=3)
    with pytest.raises(ScProtoInputError, match="setup_anndata"):
        ScProto(adata, batch_key="study")
    untrained = ScProto(adata)
    assert "not trained" in repr(untrained)
    with pytest.raises(ScProtoInputError, match="train"):
        untrained.get_latent_representation()


def test_the_default_data_is_public():
    adata = scproto.datasets.synthetic(n_cells=600, n_genes=400)
    assert adata.shape == (600, 400)
    assert list(adata.uns["query_studies"]) == ["study_3"]
    assert "counts" in adata.layers


def test_importing_scproto_leaves_the_plotting_backend_alone():
    """A notebook's inline plots must keep showing after model.train() imports the rest."""
    import os
    import subprocess
    import sys

    code = (
        "import matplotlib; import scproto.train, scproto.sweeps, scproto.benchmark.harness; "
        "print(matplotlib.get_backend())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MPLBACKEND": "svg"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().endswith("svg")
