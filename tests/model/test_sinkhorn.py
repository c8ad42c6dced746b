import torch

from scproto.model.sinkhorn import hard_assignments, sinkhorn


def random_scores(n=64, k=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, k, generator=generator), dim=1)


def test_rows_are_distributions():
    q = sinkhorn(random_scores(), epsilon=0.05, n_iters=3)
    assert torch.all(q >= 0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))


def test_prototype_marginals_converge_to_balanced():
    scores = random_scores(n=200, k=8)
    q = sinkhorn(scores, epsilon=0.05, n_iters=200)
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 200 / 8), rtol=1e-3, atol=1e-3)


def test_three_iterations_are_more_balanced_than_softmax():
    scores = random_scores(n=200, k=8) + torch.linspace(
        0, 0.5, 8
    )  # skewed towards the last prototypes
    softmax_mass = torch.softmax(scores / 0.05, dim=1).sum(dim=0)
    sinkhorn_mass = sinkhorn(scores, epsilon=0.05, n_iters=3).sum(dim=0)
    assert sinkhorn_mass.std() < 0.5 * softmax_mass.std()


def test_invariant_to_constant_shift_of_scores():
    scores = random_scores()
    torch.testing.assert_close(sinkhorn(scores, 0.02), sinkhorn(scores + 3.7, 0.02))


def test_half_precision_scores_do_not_overflow():
    q = sinkhorn(random_scores().half(), epsilon=0.02)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()


def test_tiny_epsilon_stays_finite():
    q = sinkhorn(random_scores(), epsilon=0.005)
    assert torch.isfinite(q).all()


def test_hard_assignments_are_one_hot_argmax():
    q = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
    torch.testing.assert_close(
        hard_assignments(q), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    )


def test_unbalanced_interpolates_between_softmax_and_balanced():
    scores = random_scores(n=200, k=8) + torch.linspace(0, 0.5, 8)
    softmax = torch.softmax(scores / 0.05, dim=1)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3, rho=1e-9), softmax)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3, rho=1e9), sinkhorn(scores, 0.05, 3))
    imbalance = [sinkhorn(scores, 0.05, 50, rho=rho).sum(dim=0).std() for rho in (0.01, 0.1, 1.0)]
    assert softmax.sum(dim=0).std() > imbalance[0] > imbalance[1] > imbalance[2]
    q = sinkhorn(scores, 0.05, 50, rho=0.1)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(200))


def test_unbalanced_leaves_a_missing_population_s_prototypes_empty():
    """Cells of two populations; prototypes 0-1 sit on them, 2-3 on a population this group
    lacks. Balanced codes must send half the cells to 2-3; relaxed ones keep them home."""
    generator = torch.Generator().manual_seed(0)
    population = torch.arange(100) % 2
    centres = torch.eye(4)
    cells = torch.nn.functional.normalize(
        centres[population] + 0.1 * torch.randn(100, 4, generator=generator), dim=1
    )
    scores = cells @ centres.T
    balanced = hard_assignments(sinkhorn(scores, 0.05, 3)).argmax(dim=1)
    relaxed = hard_assignments(sinkhorn(scores, 0.05, 3, rho=0.05)).argmax(dim=1)
    assert (balanced >= 2).float().mean() > 0.3
    assert torch.equal(relaxed, population)
