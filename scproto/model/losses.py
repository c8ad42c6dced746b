"""The loss terms of scProto as pure functions of scores and network outputs.

Notation: V views per anchor cell, B anchors, K prototypes. ``scores`` has shape
(V, B, K) and holds cosine similarities s_ik = ẑ_i · c_k between the normalised
representation of a view row and each unit-norm prototype.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from scproto.model.sinkhorn import hard_assignments, sinkhorn


def cross_view_prediction(
    log_p: torch.Tensor, codes: torch.Tensor, assignment_views: Sequence[int]
) -> torch.Tensor:
    """−mean_a mean_{v≠a} Σ_i Σ_k codes_a,ik log p_v,ik, for codes already scaled by each
    anchor's weight (1/B for one group).

    One contraction over every (assignment, view) pair, then the v = a terms are taken
    back out: no per-view copies of log p, so its gradient is a single dense product.
    """
    n_views = log_p.shape[0]
    cross = torch.einsum("abk,vbk->av", codes, log_p)  # (A, V)
    own = cross[torch.arange(len(assignment_views)), torch.as_tensor(assignment_views)]
    return -((cross.sum(dim=1) - own) / (n_views - 1)).mean()


def swav_codes(
    scores: torch.Tensor,
    *,
    epsilon: float,
    n_iters: int,
    hard: bool,
    rho: float | None = None,
    targets: torch.Tensor | None = None,
    queued: torch.Tensor | None = None,
):
    """The Sinkhorn codes (hard by default) of one group's rows: the swapped targets.

    ``targets``: indices of the prototypes the codes may use; Sinkhorn shares the rows
    among those columns alone and the others get zero. All K by default.
    ``queued``: score rows of the group's earlier cells (SwAV's queue), transported with
    these rows so that the equal share per prototype holds over more cells than K; only
    these rows' codes are returned.
    """
    if targets is not None:
        q = swav_codes(
            scores[:, targets],
            epsilon=epsilon,
            n_iters=n_iters,
            hard=hard,
            rho=rho,
            queued=None if queued is None else queued[:, targets],
        )
        return scores.new_zeros(scores.shape).index_copy_(1, targets, q.to(scores.dtype))
    rows = scores.shape[0]
    if queued is not None:
        scores = torch.cat([scores, queued.to(scores.dtype)])
    q = sinkhorn(scores, epsilon, n_iters, rho)[:rows]
    return hard_assignments(q) if hard else q


def swapped_prediction_loss(
    scores: torch.Tensor,
    *,
    temperature: float = 0.05,
    epsilon: float = 0.02,
    n_iters: int = 3,
    hard: bool = True,
    rho: float | None = None,
    assignment_views: Sequence[int] = (0, 1),
) -> torch.Tensor:
    """SwAV: each assignment view's codes q_a are predicted from every other view.

    L = mean_a mean_{v≠a} [ −mean_i Σ_k q_a,ik log softmax(s_v,i / τ)_k ].
    """
    log_p = F.log_softmax(scores / temperature, dim=-1)
    codes = torch.stack(
        [
            swav_codes(scores[a], epsilon=epsilon, n_iters=n_iters, hard=hard, rho=rho)
            for a in assignment_views
        ]
    )
    return cross_view_prediction(log_p, codes / scores.shape[1], assignment_views)


def coverage_gaps(scores: torch.Tensor) -> torch.Tensor:
    """1 − s to the nearest prototype, for every row: how badly each row is covered."""
    return 1.0 - scores.max(dim=-1).values


def propagation_loss(scores: torch.Tensor) -> torch.Tensor:
    """Min-max coverage: max over rows of min over prototypes of (1 − s_ik).

    Only the worst-covered row receives a gradient, pulling its nearest prototype
    towards it; this is what gives rare cell types a prototype.
    """
    return coverage_gaps(scores).max()


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of every pair i < j of rows (a flat vector, as ``torch.pdist``).

    Through the squared distances, with a floor under the root: two identical rows
    (duplicate cells) would give ``torch.pdist`` an infinite gradient.
    """
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(dim=-1)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return squared[i, j].clamp_min(1e-12).sqrt()


def distance_correlation_loss(latent: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 − Pearson correlation between the pairwise distances of the rows of ``latent`` and
    those of the same cells in ``reference``: 0 when the latent distances are an affine
    function of the reference ones, whatever the scale; the gradient moves μ only.
    """
    latent_d = pairwise_distances(latent)
    with torch.no_grad():
        reference_d = pairwise_distances(reference.float())
    latent_d = latent_d - latent_d.mean()
    reference_d = reference_d - reference_d.mean()
    r = (latent_d * reference_d).sum() / (latent_d.norm() * reference_d.norm()).clamp_min(1e-12)
    return 1.0 - r


def geometry_loss(
    mu: torch.Tensor,
    reference: torch.Tensor,
    studies: torch.Tensor,
    min_group_size: int,
    max_rows: int = 512,
) -> torch.Tensor:
    """L_geometry: the distance correlation loss within each study of the minibatch, averaged
    over the studies with at least ``min_group_size`` anchors (0 when there are none).

    Within a study, the PCA distances between cells hold the biology without any study
    effect, so keeping them does not fight the integration; across studies they would.
    A study's first ``max_rows`` anchors (in random order already) stand for it: 130k
    pairs estimate a correlation well, and the cost stays flat in the minibatch size.
    """
    members = (torch.nonzero(studies == s).squeeze(1) for s in torch.unique(studies))
    losses = [
        distance_correlation_loss(mu[m[:max_rows]], reference[m[:max_rows]])
        for m in members
        if m.numel() >= max(min_group_size, 3)
    ]
    return torch.stack(losses).mean() if losses else mu.new_zeros(())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per row, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def mse_reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over genes, averaged over rows.

    One fused kernel (forward and backward) instead of sub/pow/sum: on 8,192 × 4,000
    rows the temporaries of the unfused form cost more than the decoder's matmul.
    """
    return F.mse_loss(x_hat, x, reduction="sum") / x.shape[0]


def negative_binomial_nll(
    counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Negative log-likelihood of NB(mean, inverse dispersion θ) per row, summed over genes."""
    log_theta_mean = torch.log(theta + mean + eps)
    log_likelihood = (
        theta * (torch.log(theta + eps) - log_theta_mean)
        + counts * (torch.log(mean + eps) - log_theta_mean)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )
    return -log_likelihood.sum(dim=-1)


def group_rows(groups: torch.Tensor, min_group_size: int) -> list[torch.Tensor]:
    """Anchor indices of each group (study) in the minibatch.

    Sinkhorn on a handful of cells spreads each over many prototypes, which is noise, so
    groups under ``min_group_size`` anchors are pooled into one remainder group, kept if
    it reaches the minimum; with no group left, the minibatch is one group.
    """
    members = [torch.nonzero(groups == g).squeeze(1) for g in torch.unique(groups)]
    kept = [m for m in members if m.numel() >= min_group_size]
    small = [m for m in members if m.numel() < min_group_size]
    if small and sum(m.numel() for m in small) >= min_group_size:
        kept.append(torch.cat(small))
    return kept or [torch.arange(groups.numel(), device=groups.device)]


def single_study_queue(
    queue: Mapping[int, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor | None:
    """The queued rows of the group's study, if the group is one study that has some (a
    pooled remainder group of several studies has none)."""
    study = int(labels[0])
    return queue.get(study) if bool((labels == study).all()) else None


def batch_swav_losses(
    scores: torch.Tensor,
    groups: torch.Tensor,
    *,
    min_group_size: int = 16,
    temperature: float = 0.05,
    epsilon: float = 0.02,
    n_iters: int = 3,
    hard: bool = True,
    rho: float | None = None,
    assignment_views: Sequence[int] = (0, 1),
    targets: torch.Tensor | None = None,
    queue: Mapping[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """SwAV and propagation losses within each study, averaged with equal weight per study.

    ``scores`` (V, B, K) comes from ONE forward pass over the whole minibatch; the network
    has no cross-sample coupling, so slicing it by group equals one pass per group. Only
    Sinkhorn (no gradient) runs per group: its codes, weighted 1/(|g|·G) for an anchor of
    group g among G groups, make the equal-weight mean of the per-group SwAV losses one
    contraction over the whole minibatch. ``targets`` (see :func:`swav_codes`) narrows
    the codes only: the predictions still span all K prototypes, so rows are also pushed
    away from the prototypes they may not target. ``queue``: study → score rows of its
    earlier anchors, joined to the Sinkhorn of a group made of that study alone.
    """
    members = group_rows(groups, min_group_size)
    log_p = F.log_softmax(scores / temperature, dim=-1)  # per row: the same within any group
    codes = scores.new_zeros(len(assignment_views), *scores.shape[1:])
    with torch.no_grad():
        for m in members:
            queued = single_study_queue(queue, groups[m]) if queue else None
            for i, a in enumerate(assignment_views):
                q = swav_codes(
                    scores[a, m],
                    epsilon=epsilon,
                    n_iters=n_iters,
                    hard=hard,
                    rho=rho,
                    targets=targets,
                    queued=queued,
                )
                codes[i, m] = q / (m.numel() * len(members))
    swav = cross_view_prediction(log_p, codes, assignment_views)
    gaps = coverage_gaps(scores)
    prop = torch.stack([gaps[:, m].max() for m in members]).mean()
    return {"swav": swav, "prop": prop, "n_groups": torch.tensor(float(len(members)))}
