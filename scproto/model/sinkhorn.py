"""Sinkhorn-Knopp balanced assignment of cells to prototypes (SwAV, Caron et al. 2020)."""

import torch


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.02, n_iters: int = 3) -> torch.Tensor:
    """Balanced soft assignments Q (n × K) for scores S (n × K), each row summing to 1.

    Q = exp(S/ε) is scaled alternately so that every prototype receives 1/K of the total
    mass and every cell 1/n; after ``n_iters`` rounds the rows are rescaled to sum to 1.
    Runs in float32 whatever the input precision, and subtracts the maximum score before
    the exponential: exp(1/0.02) already overflows half precision.
    """
    scores = scores.detach().float()
    n_cells, n_prototypes = scores.shape
    q = torch.exp((scores - scores.max()) / epsilon)
    q = q / q.sum()
    tiny = torch.finfo(q.dtype).tiny  # a prototype far from every cell underflows to 0
    for _ in range(n_iters):
        q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / n_prototypes
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny) / n_cells
    return q * n_cells


def hard_assignments(q: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of Q, the default target of the swapped prediction."""
    return torch.nn.functional.one_hot(q.argmax(dim=1), q.shape[1]).to(q.dtype)
