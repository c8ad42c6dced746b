import math

import pytest
import torch

from scproto.model import losses
from scproto.model.losses import (
    batch_swav_losses,
    group_rows,
    kl_divergence,
    mse_reconstruction,
    negative_binomial_nll,
    propagation_loss,
    swapped_prediction_loss,
    swav_codes,
)


def test_swapped_prediction_on_a_hand_made_case():
    # Two cells, two prototypes, both views agree: cell i sits on prototype i, so the
    # balanced hard codes are the identity and each term is −log softmax([1, 0])_0.
    view = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = torch.stack([view, view])
    loss = swapped_prediction_loss(scores, temperature=1.0, epsilon=0.05)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_swapped_prediction_with_disagreeing_views():
    view0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    view1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # predicts the opposite prototype
    loss = swapped_prediction_loss(torch.stack([view0, view1]), temperature=1.0, hard=True)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1)), rel=1e-6)


def test_swapped_prediction_averages_over_all_other_views():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(4, 16, 5), dim=-1)
    loss = swapped_prediction_loss(scores, assignment_views=(0,))
    from scproto.model.sinkhorn import hard_assignments, sinkhorn

    q = hard_assignments(sinkhorn(scores[0]))
    manual = [-(q * torch.log_softmax(scores[v] / 0.05, dim=-1)).sum(1).mean() for v in (1, 2, 3)]
    torch.testing.assert_close(loss, torch.stack(manual).mean())


def test_soft_codes_weight_the_cross_entropy_by_q():
    from scproto.model.sinkhorn import sinkhorn

    torch.manual_seed(2)
    scores = torch.nn.functional.normalize(torch.randn(2, 12, 4), dim=-1)
    loss = swapped_prediction_loss(scores, hard=False, epsilon=0.1)
    terms = []
    for a, v in ((0, 1), (1, 0)):
        q = sinkhorn(scores[a], 0.1)
        terms.append(-(q * torch.log_softmax(scores[v] / 0.05, dim=-1)).sum(1).mean())
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert not torch.isclose(loss, swapped_prediction_loss(scores, hard=True, epsilon=0.1))


def test_propagation_is_the_worst_covered_row():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.7, 0.3]])
    assert propagation_loss(scores).item() == pytest.approx(0.5)


def test_propagation_gradient_reaches_only_the_worst_row_and_its_nearest_prototype():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.7, 0.3]], requires_grad=True)
    propagation_loss(scores).backward()
    expected = torch.zeros(3, 2)
    expected[1, 1] = -1.0
    torch.testing.assert_close(scores.grad, expected)


def test_kl_known_values():
    assert kl_divergence(torch.zeros(3, 8), torch.zeros(3, 8)).tolist() == [0.0, 0.0, 0.0]
    # KL(N(1, 1) ‖ N(0, 1)) = 1/2 per dimension
    assert kl_divergence(torch.ones(1, 2), torch.zeros(1, 2)).item() == pytest.approx(1.0)
    # KL(N(0, e) ‖ N(0, 1)) = (e − 1 − 1)/2
    assert kl_divergence(torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx(
        (math.e - 2) / 2
    )


def test_mse_sums_over_genes_and_averages_over_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 2.0]])
    assert mse_reconstruction(x, torch.zeros_like(x)).item() == pytest.approx((14.0 + 4.0) / 2)


def test_negative_binomial_matches_torch_distribution():
    counts = torch.tensor([[0.0, 3.0, 10.0]])
    mean = torch.tensor([[0.5, 2.0, 8.0]])
    theta = torch.tensor([[1.0, 4.0, 20.0]])
    reference = torch.distributions.NegativeBinomial(total_count=theta, probs=mean / (mean + theta))
    expected = -reference.log_prob(counts).sum(dim=-1)
    torch.testing.assert_close(
        negative_binomial_nll(counts, mean, theta), expected, rtol=1e-5, atol=1e-5
    )


def test_small_groups_are_pooled_and_all_small_means_one_group():
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    kept = group_rows(groups, min_group_size=3)
    assert [g.tolist() for g in kept] == [[0, 1, 2], [4, 5, 6]]  # the lone cell of 1 is dropped
    pooled = group_rows(torch.tensor([0, 0, 1, 1, 2, 2, 2]), min_group_size=3)
    assert [g.tolist() for g in pooled] == [[4, 5, 6], [0, 1, 2, 3]]
    assert [g.tolist() for g in group_rows(groups, min_group_size=10)] == [list(range(7))]


def test_batch_swav_is_the_equal_weight_mean_of_per_group_losses():
    torch.manual_seed(1)
    scores = torch.nn.functional.normalize(torch.randn(3, 40, 6), dim=-1)
    groups = torch.tensor([0] * 30 + [1] * 10)
    terms = batch_swav_losses(scores, groups, min_group_size=5)
    swav = [swapped_prediction_loss(scores[:, :30]), swapped_prediction_loss(scores[:, 30:])]
    prop = [propagation_loss(scores[:, :30]), propagation_loss(scores[:, 30:])]
    torch.testing.assert_close(terms["swav"], torch.stack(swav).mean())
    torch.testing.assert_close(terms["prop"], torch.stack(prop).mean())


@pytest.mark.parametrize("hard", [True, False])
def test_batch_swav_gradient_is_that_of_the_per_group_losses(hard):
    # One contraction over the whole minibatch must be the same function of the scores as
    # the mean of per-group losses, including the gradient that trains the network.
    torch.manual_seed(3)
    raw = torch.randn(4, 50, 7)
    groups = torch.tensor([0] * 22 + [1] * 3 + [2] * 25)  # study 1 is dropped (below 5)
    grads = []
    for per_group in (False, True):
        leaf = raw.clone().requires_grad_()
        scores = torch.nn.functional.normalize(leaf, dim=-1)
        if per_group:
            parts = [scores[:, :22], scores[:, 25:]]
            swav = torch.stack([swapped_prediction_loss(p, hard=hard) for p in parts]).mean()
            prop = torch.stack([propagation_loss(p) for p in parts]).mean()
        else:
            terms = batch_swav_losses(scores, groups, min_group_size=5, hard=hard)
            swav, prop = terms["swav"], terms["prop"]
        (swav + prop).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][:, 22:25].abs().sum() == 0  # dropped anchors get no gradient


@pytest.mark.parametrize("hard", [True, False])
def test_codes_restricted_to_targets_are_sinkhorn_over_those_columns(hard):
    torch.manual_seed(4)
    scores = torch.nn.functional.normalize(torch.randn(60, 8), dim=-1)
    targets, others = torch.tensor([1, 3, 4, 6]), torch.tensor([0, 2, 5, 7])
    settings = {"epsilon": 0.05, "n_iters": 3, "hard": hard}
    q = swav_codes(scores, targets=targets, **settings)
    assert q[:, others].abs().sum() == 0
    torch.testing.assert_close(q[:, targets], swav_codes(scores[:, targets], **settings))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(60))
    every = swav_codes(scores, targets=torch.arange(8), **settings)
    torch.testing.assert_close(every, swav_codes(scores, **settings))


def test_prototypes_outside_the_targets_are_only_pushed_away():
    # The predictions still span all K: descent lowers every row's score to a prototype
    # its codes may not use, and no code points there.
    torch.manual_seed(5)
    leaf = torch.randn(3, 40, 6).requires_grad_()
    scores = torch.nn.functional.normalize(leaf, dim=-1)
    scores.retain_grad()
    terms = batch_swav_losses(
        scores, torch.zeros(40, dtype=torch.long), targets=torch.tensor([0, 1, 2])
    )
    terms["swav"].backward()
    assert (scores.grad[..., 3:] > 0).all()


@pytest.mark.parametrize("hard", [True, False])
def test_queued_rows_share_the_transport_and_only_the_groups_codes_return(hard):
    torch.manual_seed(6)
    scores = torch.nn.functional.normalize(torch.randn(10, 20), dim=-1)  # fewer rows than K
    queued = torch.nn.functional.normalize(torch.randn(200, 20), dim=-1)
    settings = {"epsilon": 0.05, "n_iters": 3, "hard": False}
    q = swav_codes(scores, queued=queued, **settings)
    torch.testing.assert_close(q, swav_codes(torch.cat([scores, queued]), **settings)[:10])
    hard_q = swav_codes(scores, queued=queued, **{**settings, "hard": hard})
    assert hard_q.shape == (10, 20)
    assert not torch.allclose(q, swav_codes(scores, **settings))


def test_a_study_queue_joins_only_a_group_of_that_study():
    torch.manual_seed(7)
    scores = torch.nn.functional.normalize(torch.randn(2, 40, 30), dim=-1)
    groups = torch.tensor([0] * 20 + [1] * 20)
    queued = torch.nn.functional.normalize(torch.randn(100, 30), dim=-1)
    plain = batch_swav_losses(scores, groups, min_group_size=5)["swav"]
    elsewhere = batch_swav_losses(scores, groups, min_group_size=5, queue={5: queued})["swav"]
    own = batch_swav_losses(scores, groups, min_group_size=5, queue={1: queued})["swav"]
    torch.testing.assert_close(elsewhere, plain)
    assert not torch.isclose(own, plain)


def test_pairwise_distances_match_torch_pdist_and_stay_finite_on_duplicates():
    x = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(losses.pairwise_distances(x), torch.pdist(x))
    twins = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    losses.distance_correlation_loss(twins, torch.randn(3, 4)).backward()
    assert torch.isfinite(twins.grad).all()


def test_distance_correlation_is_zero_for_a_scaled_rotation_and_ignores_scale():
    reference = torch.randn(40, 5, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    same_geometry = 3.0 * reference @ rotation + 1.0
    assert losses.distance_correlation_loss(same_geometry, reference) < 1e-12
    latent = torch.randn(40, 5, dtype=torch.float64)
    torch.testing.assert_close(
        losses.distance_correlation_loss(latent, reference),
        losses.distance_correlation_loss(10.0 * latent, 0.1 * reference),
    )
    assert 0.0 < losses.distance_correlation_loss(latent, reference) <= 2.0


def test_distance_correlation_gradient_restores_the_reference_geometry():
    torch.manual_seed(0)
    reference = torch.randn(30, 4)
    latent = torch.randn(30, 2, requires_grad=True)
    optimiser = torch.optim.Adam([latent], lr=0.05)
    start = float(losses.distance_correlation_loss(latent.detach(), reference))
    for _ in range(200):
        optimiser.zero_grad()
        losses.distance_correlation_loss(latent, reference).backward()
        optimiser.step()
    assert float(losses.distance_correlation_loss(latent.detach(), reference)) < start / 3


def test_geometry_loss_compares_cells_within_a_study_only():
    """Two studies shifted far apart in the reference (a study effect) and overlapping in
    μ (integrated): the loss does not see the shift, and is the mean of the per-study ones."""
    torch.manual_seed(1)
    a, b = torch.randn(20, 3), torch.randn(20, 3)
    reference = torch.cat([a, b + 100.0])
    studies = torch.tensor([0] * 20 + [1] * 20)
    assert losses.geometry_loss(torch.cat([a, b]), reference, studies, min_group_size=16) < 1e-6
    mu = torch.randn(40, 3)
    per_study = [
        losses.distance_correlation_loss(mu[s], reference[s]) for s in (studies == 0, studies == 1)
    ]
    torch.testing.assert_close(
        losses.geometry_loss(mu, reference, studies, min_group_size=16), sum(per_study) / 2
    )
    # studies under min_group_size are left out; none left: zero
    assert losses.geometry_loss(mu, reference, studies, min_group_size=21) == 0
