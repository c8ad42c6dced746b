"""Sinkhorn-Knopp balanced assignment of cells to prototypes (SwAV, Caron et al. 2020)."""

import torch


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.02,
    n_iters: int = 3,
    rho: float | None = None,
) -> torch.Tensor:
    """Soft assignments Q (n × K) for scores S (n × K), each row summing to 1.

    Q = exp(S/ε) is scaled alternately so that every prototype receives 1/K of the total
    mass and every cell 1/n; after ``n_iters`` rounds the rows are rescaled to sum to 1.
    Runs in float32 whatever the input precision, and subtracts the maximum score before
    the exponential: exp(1/0.02) already overflows half precision.

    ``rho``: unbalanced transport (Chizat et al. 2018), the prototype marginal enforced
    only through a KL penalty of weight ρ, so the prototype scaling is raised to
    ρ / (ρ + ε): a cell group that lacks a population may leave its prototypes emptier
    than 1/K instead of sending other cells there. None: balanced (ρ = ∞); ρ → 0: each
    cell's own softmax.
    """
    scores = scores.detach().float()
    n_cells, n_prototypes = scores.shape
    q = torch.exp((scores - scores.max()) / epsilon)
    q = q / q.sum()
    tiny = torch.finfo(q.dtype).tiny  # a prototype far from every cell underflows to 0
    if rho is not None:
        return _unbalanced(q, rho / (rho + epsilon), n_iters, tiny) * n_cells
    # ρ = ∞ in _unbalanced's form is the same transport, but not the same floats: this loop
    # keeps the balanced codes (and so every trained model) bit for bit as before
    for _ in range(n_iters):
        q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / n_prototypes
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny) / n_cells
    return q * n_cells


def _unbalanced(kernel: torch.Tensor, power: float, n_iters: int, tiny: float) -> torch.Tensor:
    """Sinkhorn's scalings u (cells, exact 1/n) and v (prototypes, 1/K relaxed to the power
    ρ/(ρ+ε)) of the kernel, as Q = diag(u) kernel diag(v) with rows summing to 1/n.

    The relaxed update must be applied to v itself: applied to Q again each round, as the
    balanced loop does, the partial corrections would compound to the balanced solution.
    """
    n_cells, n_prototypes = kernel.shape
    u = kernel.new_ones(n_cells, 1)
    for _ in range(n_iters):
        column = (u * kernel).sum(dim=0, keepdim=True).clamp_min(tiny) * n_prototypes
        v = column**-power
        u = 1.0 / ((kernel * v).sum(dim=1, keepdim=True).clamp_min(tiny) * n_cells)
    return u * kernel * v


def hard_assignments(q: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of Q, the default target of the swapped prediction."""
    return torch.nn.functional.one_hot(q.argmax(dim=1), q.shape[1]).to(q.dtype)
