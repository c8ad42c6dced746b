"""Every setting is checked before any data is read, in one message."""

import pytest

from scproto.errors import ScProtoInputError
from scproto.run.settings import Bound, validate_config


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("sinkhorn.epsilon=0", "`sinkhorn.epsilon=0` is not valid; it must be a number > 0"),
        ("sinkhorn.epsilon=-0.05", "`sinkhorn.epsilon=-0.05`"),
        ("loss.temperature=0", "`loss.temperature=0`"),
        ("optimizer.lr=0", "`optimizer.lr=0`"),
        ("model.latent_dim=0", "`model.latent_dim=0` is not valid; it must be an integer ≥ 1"),
        ("model.latent_dim=-1", "`model.latent_dim=-1`"),
        ("model.latent_dim=2.5", "`model.latent_dim=2.5`"),
        ("trainer.max_epochs=0", "`trainer.max_epochs=0`"),
        ("model.dropout=1", "`model.dropout=1`"),
        ("query.epochs=-1", "`query.epochs=-1`"),
        ("data.geometry_smoothing=-1", "`data.geometry_smoothing=-1`"),
        ("loss.gene_scale_sd=-0.5", "`loss.gene_scale_sd=-0.5`"),
        ("data.batch_size=0", "`data.batch_size=0`"),
        ("label_transfer.uncertainty_threshold=2", "must be a number ≥ 0 and ≤ 1"),
        ("overwrite=yes", "`overwrite=yes` is not valid; it must be true or false"),
        ("model.likelihood=zinb", "choose one of mse, nb"),
        (
            "+loss.lambda_porp=1",
            "`loss.lambda_porp` is not a setting; did you mean `loss.lambda_prop`?",
        ),
        ("+model.n_prototype=30", "did you mean `model.n_prototypes`?"),
        ("+sed=3", "did you mean `seed`?"),
        ("+trainer.max_epoch=3", "did you mean `trainer.max_epochs`?"),
        ("+optimizer.momentum=0.9", "`optimizer.momentum` is not a setting"),  # Adam has none
        ("ckpt_path=/nowhere/last.ckpt", "ckpt_path=/nowhere/last.ckpt: no such checkpoint"),
        (
            "loss.cvae_views=0",
            "`loss.cvae_views=0` is not valid; it must be an integer ≥ 1, or null",
        ),
        ("loss.cvae_views=9", "`loss.cvae_views=9` exceeds `data.n_views=8`"),
    ],
)
def test_bad_settings_are_named(make_config, override, words):
    with pytest.raises(ScProtoInputError) as caught:
        validate_config(make_config(override))
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimizer=lars", "optimizer.momentum=0.5"],
        ["+trainer.max_steps=20", "+trainer.reload_dataloaders_every_n_epochs=1"],
        ["data.synthetic.n_studies=5", "eval=fast", "+eval.markers.tasks.mine.genes=[A]"],
        ["model.hidden_dim=null", "eval.subsample=null"],
        ["loss.cvae_views=1"],
    ],
)
def test_valid_settings_pass(make_config, overrides):
    validate_config(make_config(*overrides))


def test_several_mistakes_come_in_one_message(make_config):
    with pytest.raises(ScProtoInputError, match="settings to fix") as caught:
        validate_config(make_config("sinkhorn.epsilon=0", "model.latent_dim=0"))
    assert "sinkhorn.epsilon" in str(caught.value) and "model.latent_dim" in str(caught.value)


def test_bounds():
    positive = Bound(low=0, low_open=True)
    assert positive.admits(1e-9) and not positive.admits(0) and not positive.admits(float("nan"))
    assert not positive.admits(True) and not positive.admits("1")
    counts = Bound(low=1, integer=True, optional=True)
    assert counts.admits(None) and counts.admits(3) and not counts.admits(3.0)
    assert counts.describe() == "an integer ≥ 1, or null"
