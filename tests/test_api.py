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
    with pytest.raises(ScProtoInputError, match="trained on raw counts, but X looks like log"):
        model.get_latent(adata)


def test_missing_study_key(model, small_adata):
    with pytest.raises(ScProtoInputError, match="obs\\['study'\\]"):
        model.get_latent(small_adata[:, :].copy().__class__(small_adata.X, var=small_adata.var))


def test_a_foreign_file_is_named_without_torch_advice(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ScProtoInputError, match="is not a readable checkpoint") as caught:
        ScProto.load(path)
    assert "weights_only" not in str(caught.value)


def test_all_zero_query_cells_are_not_called_log_data(model, small_adata):
    adata = small_adata[:50].copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)
    with pytest.warns(UserWarning, match="all-zero"):
        assert model.get_latent(adata).shape == (50, 8)


def test_an_anndata_without_x_is_named(model, small_adata):
    import anndata as ad

    embedding_only = ad.AnnData(obs=small_adata.obs.copy(), var=small_adata.var.copy())
    with pytest.raises(ScProtoInputError, match="no expression matrix \\(X is None\\)"):
        model.get_latent(embedding_only)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda m, a: m.map_query(a, epochs=-1), "epochs=-1 is not valid"),
        (lambda m, a: m.map_query(a, lr=0.0), "lr=0.0 is not valid"),
        (lambda m, a: m.map_query(a, batch_size=0), "batch_size=0 is not valid"),
        (lambda m, a: m.get_latent(a, batch_size=0), "batch_size=0 is not valid"),
    ],
)
def test_bad_arguments_are_named(model, small_adata, call, words):
    with pytest.raises(ScProtoInputError, match=words):
        call(model, small_adata)


def test_save_into_a_directory_and_load_it_back(model, small_adata, tmp_path):
    assert model.save(tmp_path / "file.ckpt") == tmp_path / "file.ckpt"
    (tmp_path / "dir").mkdir()
    assert model.save(tmp_path / "dir") == tmp_path / "dir" / "model.ckpt"
    assert model.save(f"{tmp_path / 'new'}/") == tmp_path / "new" / "model.ckpt"
    reloaded = ScProto.load(tmp_path / "dir")
    np.testing.assert_array_equal(reloaded.get_latent(small_adata), model.get_latent(small_adata))
    with pytest.raises(ScProtoInputError, match="exists; pass overwrite=True"):
        model.save(tmp_path / "dir")
    model.save(tmp_path / "dir", overwrite=True)


def test_mapping_nothing_new_says_so(model, small_adata, tmp_path, caplog):
    import logging

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from scproto.map_query import map_file
    from scproto.train import CONFIG_DIR

    model.save(tmp_path / "model.ckpt")
    small_adata.write_h5ad(tmp_path / "known.h5ad")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="map_query",
            overrides=[f"ckpt={tmp_path / 'model.ckpt'}", f"data.path={tmp_path / 'known.h5ad'}"],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "mapped")
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="nothing to map"):
        map_file(cfg)
    assert "nothing was trained" in caplog.text and "mapped []" not in caplog.text


def test_a_checkpoint_from_before_decoder_hidden_dim_loads_with_the_encoders_width(model, tmp_path):
    """Until 0.3 the decoder was as wide as the encoder and the setting did not exist."""
    import torch

    from scproto.model.module import ScProtoModule

    hparams = {k: v for k, v in model.module.hparams.items() if k != "decoder_hidden_dim"}
    torch.manual_seed(0)
    narrow = ScProtoModule(**hparams, decoder_hidden_dim=None)
    path = model.save(tmp_path / "new.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = hparams
    checkpoint["state_dict"] = narrow.state_dict()
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = ScProto.load(tmp_path / "old.ckpt")
    width = narrow.cvae.encoder.data.out_features
    assert old.module.cvae.decoder.data.out_features == width
    assert model.module.cvae.decoder.data.out_features == 128 != width
    torch.testing.assert_close(old.module.cvae.output_head.weight, narrow.cvae.output_head.weight)


def test_a_checkpoint_from_before_assignment_assigns_by_cosine(model, tmp_path):
    """Until 0.3 a cell took the prototype of highest cosine and the setting did not exist."""
    import torch

    path = model.save(tmp_path / "new.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["assignment"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = ScProto.load(tmp_path / "old.ckpt")
    assert old.module.hparams.assignment == "cosine" and old.assignment == "cosine"
    assert model.assignment == "point"


def test_a_checkpoint_of_version_0_1_loads(model, small_adata, tmp_path):
    """0.1 stored the Sinkhorn settings as sinkhorn_iters / hard_assignment."""
    import torch

    path = model.save(tmp_path / "new.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    settings = checkpoint["hyper_parameters"]
    settings["sinkhorn_iters"], settings["hard_assignment"] = (
        settings.pop("n_iters"),
        settings.pop("hard"),
    )
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = ScProto.load(tmp_path / "old.ckpt")
    assert old.module.hparams.n_iters == model.module.hparams.n_iters
    np.testing.assert_array_equal(
        old.get_latent_representation(small_adata), model.get_latent_representation(small_adata)
    )
