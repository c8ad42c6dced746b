"""scArches surgery: only the new studies' rows move; genes are matched by name."""

import numpy as np
import pytest
import torch

from scproto import ScProto, ScProtoInputError
from scproto.train import train
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    """The trained model before query mapping: it has seen only study_0..2."""
    run = tmp_path_factory.mktemp("query") / "run"
    _, objects = train(compose_config(run, ["query.epochs=2"]))
    return objects["reference_model"]


@pytest.fixture
def query(small_adata):
    return small_adata[small_adata.obs["study"] == "study_3"].copy()


def test_surgery_freezes_everything_but_the_new_rows(reference_model, query):
    before = {k: v.clone() for k, v in reference_model.module.state_dict().items()}
    mapped = reference_model.map_query(query, epochs=5)
    after = mapped.module.state_dict()
    n_old = len(reference_model.studies)
    for name, value in before.items():
        if name == "cvae.study_embedding.weight":
            torch.testing.assert_close(after[name][:n_old], value, rtol=0, atol=0)
            assert after[name].shape[0] == n_old + 1
        else:
            torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    start = reference_model.module.cvae.mean_study_embedding()
    assert not torch.allclose(after["cvae.study_embedding.weight"][n_old], start)
    assert mapped.mapping_losses[-1] < mapped.mapping_losses[0]
    # the original model is untouched
    torch.testing.assert_close(
        reference_model.module.state_dict()["cvae.study_embedding.weight"],
        before["cvae.study_embedding.weight"],
    )


def test_zero_epochs_equals_the_mean_embedding_encoding(reference_model, query):
    mapped = reference_model.map_query(query, epochs=0)
    np.testing.assert_allclose(
        mapped.get_latent(query), reference_model.get_latent(query), atol=1e-6
    )


def test_shuffled_gene_order_gives_the_same_mapping(reference_model, query):
    order = np.random.default_rng(0).permutation(query.n_vars)
    shuffled = query[:, order].copy()
    a = reference_model.map_query(query, epochs=3, seed=1)
    b = reference_model.map_query(shuffled, epochs=3, seed=1)
    np.testing.assert_allclose(a.get_latent(query), b.get_latent(shuffled), rtol=1e-5, atol=1e-5)


def test_ten_percent_missing_genes_warn_and_run(reference_model, query):
    keep = np.random.default_rng(0).permutation(query.n_vars)[: int(query.n_vars * 0.9)]
    with pytest.warns(UserWarning, match=r"\d+ of the model's \d+ genes are missing"):
        mapped = reference_model.map_query(query[:, keep].copy(), epochs=2)
        latent = mapped.get_latent(query[:, keep].copy())
    assert np.isfinite(latent).all()


def test_no_overlapping_genes_fail_clearly(reference_model, query):
    renamed = query.copy()
    renamed.var_names = [f"other_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ScProtoInputError, match="Only 0 of the model's"):
        reference_model.map_query(renamed, epochs=1)


def test_mapped_model_saves_and_reloads(reference_model, query, tmp_path):
    mapped = reference_model.map_query(query, epochs=2)
    mapped.save(tmp_path / "mapped.ckpt")
    reloaded = ScProto.load(tmp_path / "mapped.ckpt")
    assert reloaded.studies == [*reference_model.studies, "study_3"]
    np.testing.assert_array_equal(reloaded.get_latent(query), mapped.get_latent(query))
