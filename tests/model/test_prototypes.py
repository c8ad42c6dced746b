"""Prototype initialisation by spherical k-means, and the CVAE warm-up that precedes it."""

import pytest
import torch

from scproto.model.prototypes import kmeans_prototypes


def clustered(n_per_cluster=200, dim=8, n_clusters=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(
        torch.randn(n_clusters, dim, generator=generator), dim=1
    )
    noise = 0.05 * torch.randn(n_clusters, n_per_cluster, dim, generator=generator)
    scale = 1 + 3 * torch.rand(n_clusters, n_per_cluster, 1, generator=generator)  # norms vary
    return centres, ((centres[:, None] + noise) * scale).reshape(-1, dim)


def test_centroids_are_unit_directions_on_every_cluster():
    centres, points = clustered()
    prototypes = kmeans_prototypes(points, 10, seed=0)
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(10))
    # each true direction has a prototype within a few degrees of it
    assert (centres @ prototypes.T).max(dim=1).values.min() > 0.99


def test_every_prototype_is_some_cells_nearest():
    _, points = clustered(n_clusters=10)
    prototypes = kmeans_prototypes(points, 30, seed=1)
    nearest = (torch.nn.functional.normalize(points, dim=1) @ prototypes.T).argmax(dim=1)
    assert nearest.unique().numel() == 30


def test_fewer_cells_than_prototypes_pads_with_random_directions():
    _, points = clustered(n_per_cluster=2, n_clusters=3)
    prototypes = kmeans_prototypes(points, 10, seed=0)
    assert prototypes.shape == (10, 8)
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(10))


def test_same_seed_same_centroids():
    _, points = clustered()
    torch.testing.assert_close(
        kmeans_prototypes(points, 7, seed=3), kmeans_prototypes(points, 7, seed=3)
    )


def test_during_the_warm_up_the_loss_is_the_cvae_term_alone():
    from tests.model.test_module import make_batch, make_module

    module = make_module(lambda_cvae=0.1, cvae_warmup_epochs=1, prototype_init="kmeans").train()
    with torch.no_grad():
        terms = module.compute_losses(make_batch())
    torch.testing.assert_close(terms["loss"], 0.1 * terms["cvae"])
    # the warm-up's last epoch (epoch 0 outside a trainer) keeps the anchors' μ for k-means
    assert len(module._anchors) == 1 and module._anchors[0].shape == (48, 8)
    assert module._usage.sum() == 48


def test_after_the_warm_up_the_prototypes_are_the_centroids_of_the_anchors(
    make_config, monkeypatch
):
    import scproto.model.module as module_code
    from scproto.train import train

    calls = []

    def spy(mu, k, **kwargs):
        calls.append(kmeans_prototypes(mu, k, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module_code, "kmeans_prototypes", spy)
    # fast_dev_run-like: one step after the warm-up leaves the prototypes near the centroids
    cfg = make_config("model.prototype_init=kmeans", "model.cvae_warmup_epochs=1")
    _, objects = train(cfg)
    assert len(calls) == 1 and calls[0].shape == (20, 8)
    trained = objects["model"].module.prototypes.detach()
    assert torch.nn.functional.cosine_similarity(trained, calls[0]).min() > 0.5


def test_warm_up_longer_than_training_is_refused(make_config):
    from scproto.errors import ScProtoInputError
    from scproto.train import train

    with pytest.raises(ScProtoInputError, match="cvae_warmup_epochs"):
        train(make_config("model.cvae_warmup_epochs=2", "trainer.max_epochs=2"))


def test_reseeding_moves_only_unused_prototypes_onto_distinct_anchors():
    from scproto.model.prototypes import reseed_unused

    prototypes = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    usage = torch.tensor([5, 0, 3, 0, 0, 1])
    anchors = torch.randn(40, 8) * 3
    new = reseed_unused(prototypes, usage, anchors, seed=0)
    used = usage > 0
    torch.testing.assert_close(new[used], prototypes[used])
    torch.testing.assert_close(new.norm(dim=1), torch.ones(6))
    directions = torch.nn.functional.normalize(anchors, dim=1)
    matches = (new[~used] @ directions.T).isclose(torch.tensor(1.0), atol=1e-5)
    assert matches.any(dim=1).all() and matches.any(dim=0).sum() == 3  # three distinct anchors
    torch.testing.assert_close(new, reseed_unused(prototypes, usage, anchors, seed=0))
    torch.testing.assert_close(reseed_unused(prototypes, usage + 1, anchors), prototypes)


def test_training_with_reseeding_logs_how_many_prototypes_were_restarted(make_config):
    from scproto.train import train

    cfg = make_config(
        "model.prototype_init=kmeans",
        "model.cvae_warmup_epochs=1",
        "model.reseed_prototypes=true",
        "trainer.max_epochs=3",
    )
    _, objects = train(cfg)
    history = objects["trainer"].logged_metrics
    assert 0 <= float(history["train/prototypes_reseeded"]) <= 20


def test_query_mapping_takes_the_full_loss_and_records_nothing_whatever_the_warm_up():
    """compute_losses(during_fit=False): a mapped model's warm-up setting is history."""
    from tests.model.test_module import make_batch, make_module

    module = make_module(lambda_cvae=0.1, cvae_warmup_epochs=1, prototype_init="kmeans").train()
    with torch.no_grad():
        terms = module.compute_losses(make_batch(), during_fit=False)
    torch.testing.assert_close(terms["loss"], terms["swav"] + terms["prop"] + 0.1 * terms["cvae"])
    assert not module._anchors and module._usage.sum() == 0
