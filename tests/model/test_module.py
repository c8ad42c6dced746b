import numpy as np
import pytest
import torch

from scproto.errors import ScProtoInputError
from scproto.model.losses import geometry_loss, propagation_loss, swapped_prediction_loss
from scproto.model.module import ScProtoModule
from scproto.model.optim import LARS, warmup_cosine

N_VIEWS, N_ANCHORS, N_GENES = 4, 48, 30


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(N_VIEWS * N_ANCHORS, N_GENES, generator=generator)
    anchor_study = torch.tensor([0] * 20 + [1] * 16 + [2] * 12)
    # neighbours mostly share the anchor's study, sometimes not
    study = anchor_study.repeat(N_VIEWS)
    study[N_ANCHORS::7] = 2
    return {"x": x, "study": study}


def make_module(**kwargs):
    torch.manual_seed(0)
    settings = dict(n_views=N_VIEWS, n_prototypes=6, dropout=0.0, min_group_size=4, epsilon=0.05)
    settings["lambda_geometry"] = 0.0  # the hand-made batches carry no PCA coordinates
    return ScProtoModule(N_GENES, 3, **{**settings, **kwargs}).eval()


@pytest.mark.parametrize("group_by", ["anchor", "majority"])
def test_one_forward_pass_equals_one_pass_per_study(group_by):
    module, batch = make_module(group_by=group_by), make_batch()
    with torch.no_grad():
        terms = module.compute_losses(batch)
        groups = module.study_groups(batch["study"])
        swav, prop = [], []
        for g in groups.unique():
            anchors = torch.nonzero(groups == g).squeeze(1)
            rows = (torch.arange(N_VIEWS)[:, None] * N_ANCHORS + anchors[None, :]).reshape(-1)
            mu, _ = module.cvae.encode(batch["x"][rows], batch["study"][rows])
            scores = module.scores(mu).view(N_VIEWS, len(anchors), -1)
            swav.append(swapped_prediction_loss(scores, temperature=0.05, epsilon=0.05))
            prop.append(propagation_loss(scores))
    torch.testing.assert_close(terms["swav"], torch.stack(swav).mean())
    torch.testing.assert_close(terms["prop"], torch.stack(prop).mean())


def test_total_loss_combines_terms_with_their_weights():
    module = make_module(lambda_prop=3.0, lambda_cvae=0.1, kl_weight=0.5)
    with torch.no_grad():
        t = module.compute_losses(make_batch())
    torch.testing.assert_close(t["cvae"], t["recon"] + 0.5 * t["kl"])
    torch.testing.assert_close(t["loss"], t["swav"] + 3.0 * t["prop"] + 0.1 * t["cvae"])


def test_the_queue_keeps_each_studys_latest_anchors_and_joins_the_next_sinkhorn():
    module = make_module(queue_size=30).train()
    with torch.no_grad():
        module.compute_losses(make_batch(0))
        assert {s: len(q) for s, q in module._queue.items()} == {0: 20, 1: 16, 2: 12}
        second = make_batch(1)
        with_queue = module.compute_losses(second)["swav"]
        assert {s: len(q) for s, q in module._queue.items()} == {0: 30, 1: 30, 2: 24}
        mu, _ = module.cvae.encode(second["x"][:N_ANCHORS], second["study"][:N_ANCHORS])
        newest = torch.nn.functional.normalize(mu[:20], dim=1)
        torch.testing.assert_close(module._queue[0][:20], newest)  # newest first
        without = make_module(queue_size=0).train().compute_losses(second)["swav"]
    assert not torch.isclose(with_queue, without)


def test_geometry_term_compares_the_anchors_mu_with_their_pca_within_studies():
    batch = make_batch()
    batch["pca"] = torch.randn(N_VIEWS * N_ANCHORS, 5, generator=torch.Generator().manual_seed(3))
    module = make_module(lambda_geometry=2.0)
    t = module.compute_losses(batch)
    mu = module.cvae.encode(batch["x"][:N_ANCHORS], batch["study"][:N_ANCHORS])[0]
    expected = geometry_loss(mu, batch["pca"][:N_ANCHORS], batch["study"][:N_ANCHORS], 4)
    torch.testing.assert_close(t["geometry"], expected)
    torch.testing.assert_close(
        t["loss"], t["swav"] + t["prop"] + 0.01 * t["cvae"] + 2.0 * t["geometry"]
    )
    t["geometry"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.cvae.parameters())
    assert module.prototypes.grad is None  # the geometry is μ's, not the prototypes'


def test_geometry_term_without_pca_coordinates_says_what_to_do():
    with pytest.raises(ScProtoInputError, match="lambda_geometry=0"):
        make_module(lambda_geometry=1.0).compute_losses(make_batch())


@pytest.mark.parametrize("likelihood", ["mse", "nb"])
def test_cvae_views_reconstructs_the_first_views_only(likelihood):
    batch = make_batch()
    batch["counts"] = torch.poisson(batch["x"] * 5)
    anchors = slice(0, N_ANCHORS)
    with torch.no_grad():
        every = make_module(likelihood=likelihood).compute_losses(batch)
        same = make_module(likelihood=likelihood, cvae_views=N_VIEWS).compute_losses(batch)
        first = make_module(likelihood=likelihood, cvae_views=1).compute_losses(batch)
        module = make_module(likelihood=likelihood)
        alone = {k: v[anchors] for k, v in batch.items()}
        reference = module.cvae.loss(
            alone["x"], alone["study"], module.cvae(alone["x"], alone["study"]), alone["counts"]
        )
    for name in ("recon", "kl", "swav", "prop"):
        torch.testing.assert_close(same[name], every[name])
    torch.testing.assert_close(first["recon"], reference["recon"])
    torch.testing.assert_close(first["kl"], reference["kl"])
    torch.testing.assert_close(first["swav"], every["swav"])  # the encoder still sees every view
    assert not torch.isclose(first["recon"], every["recon"])


def test_cvae_views_beyond_the_views_is_refused():
    with pytest.raises(ScProtoInputError, match="cvae_views=5 must be between 1 and the 4 views"):
        make_module(cvae_views=5)


def test_majority_grouping_uses_the_views_mode():
    module = make_module(group_by="majority")
    # view-major rows: anchor 0's views are studies 2, 1, 1, 0; anchor 1's are 0, 2, 0, 2 (tie → lower)
    study = torch.tensor([2, 0, 1, 2, 1, 0, 0, 2])
    assert module.study_groups(study).tolist() == [1, 0]
    assert make_module(group_by="anchor").study_groups(study).tolist() == [2, 0]


def test_nb_likelihood_runs_and_is_finite():
    module = make_module(likelihood="nb")
    batch = make_batch()
    batch["counts"] = torch.poisson(batch["x"] * 5)
    terms = module.compute_losses(batch)
    assert torch.isfinite(terms["loss"]) and terms["recon"] > 0


def test_unseen_study_gets_the_mean_embedding():
    cvae = make_module().cvae
    mean = cvae.mean_study_embedding()
    torch.testing.assert_close(cvae.condition(torch.tensor([-1]))[0], mean)


def test_lars_update_follows_the_trust_ratio():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    weight.grad = torch.tensor([0.6, 0.8])  # norm 1
    LARS([weight], lr=2.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01, eps=0.0).step()
    # step = lr · η · ‖w‖/‖g‖ · g = 2 · 0.01 · 5 · g
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0 - 0.06, 4.0 - 0.08]))


def test_warmup_cosine_schedule():
    kwargs = dict(warmup_steps=10, total_steps=110)
    assert warmup_cosine(0, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine(9, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine(60, **kwargs) == pytest.approx(0.5)
    assert warmup_cosine(110, **kwargs) == pytest.approx(0.0, abs=1e-12)


def test_prototype_freeze_drops_prototype_gradients_for_the_first_iterations():
    module = make_module(freeze_prototypes_iters=5)
    module.compute_losses(make_batch())["loss"].backward()
    assert module.prototypes.grad is not None
    module.on_after_backward()  # global_step is 0 < 5 outside a trainer
    assert module.prototypes.grad is None
    assert module.cvae.encoder.data.weight.grad is not None


def test_scores_and_sinkhorn_stay_float32_under_mixed_precision():
    """Autocast would run the score matmul in half precision; Sinkhorn divides by ε = 0.02."""
    from scproto.model.sinkhorn import sinkhorn

    module = make_module()
    batch = make_batch()
    reference = module.scores(module.cvae(batch["x"], batch["study"])["mu"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu = module.cvae(batch["x"], batch["study"])["mu"]
        scores = module.scores(mu)
        q = sinkhorn(scores, epsilon=0.02)
        terms = module.compute_losses(batch)
    assert scores.dtype == q.dtype == torch.float32
    assert torch.isfinite(terms["loss"]) and torch.isfinite(terms["swav"])
    # the bfloat16 encoder moves μ a little; the scores themselves are not rounded to bf16
    assert (scores - reference).abs().max() < 0.05


def test_geometry_coordinates_are_each_studys_own_pca(small_adata):
    """One row per training cell; within a study, the distances of that study's own PCA
    (a study effect added to one study alone leaves them unchanged)."""
    from scipy.spatial.distance import pdist

    from scproto.data.datamodule import ScProtoDataModule
    from scproto.data.preprocess import randomized_pca

    datamodule = ScProtoDataModule(
        small_adata, batch_key="study", n_top_genes=50, geometry_pcs=4, n_neighbors=10
    )
    datamodule.setup()
    assert datamodule.pca.shape == (len(datamodule.train_index), 4)
    codes = datamodule.study_codes[datamodule.train_index]
    cells = np.flatnonzero(codes == 1)
    own = randomized_pca(datamodule.x, 4, seed=datamodule.seed, rows=datamodule.train_index[cells])
    np.testing.assert_allclose(pdist(datamodule.pca[cells]), pdist(own), rtol=1e-4, atol=1e-4)
    assert ScProtoDataModule(small_adata, batch_key="study", geometry_pcs=0).geometry_pcs == 0


def test_max_steps_without_max_epochs_trains(small_adata):
    # Lightning leaves the epoch unsized until the loader is built; the LR schedule needs it.
    import pytorch_lightning as pl

    from scproto.data.datamodule import ScProtoDataModule

    datamodule = ScProtoDataModule(small_adata, batch_key="study", batch_size=64, n_top_genes=50)
    datamodule.setup()
    module = ScProtoModule(
        50,
        len(datamodule.studies),
        n_prototypes=10,
        optimizer={"name": "lars", "lr": 1.0, "warmup_epochs": 1},
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3


def test_zero_study_shifts_leave_the_model_unchanged_and_unseen_studies_get_none():
    module = make_module()
    batch = make_batch()
    with torch.no_grad():
        before = module.cvae(batch["x"], batch["study"])
        module.cvae.add_study_shifts()
        after = module.cvae(batch["x"], batch["study"])
        torch.testing.assert_close(after["mu"], before["mu"], rtol=0, atol=0)
        torch.testing.assert_close(after["decoded"], before["decoded"], rtol=0, atol=0)
        shift = module.cvae.encoder.study_shift.weight
        shift[2] = torch.randn(shift.shape[1], generator=torch.Generator().manual_seed(1))
        shifted = module.cvae.encode(batch["x"], batch["study"])[0]
        unseen = torch.full_like(batch["study"], -1)
        mean = module.cvae.mean_study_embedding().expand(len(unseen), -1)
        no_shift = module.cvae.mean_head(module.cvae.encoder(batch["x"], mean))
        torch.testing.assert_close(module.cvae.encode(batch["x"], unseen)[0], no_shift)
    moved = (shifted - before["mu"]).abs().sum(dim=1) > 0
    assert torch.equal(moved, batch["study"] == 2)  # only study 2's rows move


def test_decoder_width_is_its_own_and_null_follows_the_encoder():
    wide = make_module(hidden_dim=7, decoder_hidden_dim=11).cvae
    assert wide.encoder.data.out_features == 7 and wide.mean_head.in_features == 7
    assert wide.decoder.data.out_features == 11 and wide.output_head.in_features == 11
    same = make_module(hidden_dim=7, decoder_hidden_dim=None).cvae
    assert same.decoder.data.out_features == same.output_head.in_features == 7
    same.add_study_shifts()  # each block's shift is as wide as that block
    assert same.decoder.study_shift.embedding_dim == 7
    wide.add_study_shifts()
    assert (wide.encoder.study_shift.embedding_dim, wide.decoder.study_shift.embedding_dim) == (
        7,
        11,
    )
