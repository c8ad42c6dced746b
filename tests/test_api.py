"""A saved model refuses new data it cannot embed faithfully, with a message."""

import numpy as np
import pytest
import scipy.sparse as sp

from scproto import ScProto, ScProtoInputError
from scproto.train import train


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.conftest import compose_config

    run = tmp_path_factory.mktemp("api") / "run"
    train(compose_config(run))
    return ScProto.load(run / "checkpoints" / "last.ckpt")


def test_duplicated_genes(model, small_adata):
    adata = small_adata.copy()
    names = adata.var_names.to_list()
    names[3] = names[2]
    adata.var_names = names
    with pytest.raises(ScProtoInputError, match="occur more than once"):
        model.get_latent(adata)


def test_non_finite_values(model, small_adata):
    adata = small_adata.copy()
    adata.X = adata.X.copy()
    adata.X.data[0] = np.inf
    with pytest.raises(ScProtoInputError, match="non-finite"):
        model.get_latent(adata)


def test_log_data_for_a_model_trained_on_counts(model, small_adata):
    adata = small_adata.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(
        ScProtoInputError, match="trained on raw counts in X, but this X looks like log"
    ):
        model.get_latent(adata)


def test_missing_study_key(model, small_adata):
    with pytest.raises(ScProtoInputError, match="obs\\['study'\\]"):
        model.get_latent(small_adata[:, :].copy().__class__(small_adata.X, var=small_adata.var))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ScProtoInputError, match="could not be read as an scProto checkpoint"):
        ScProto.load(path)
