"""The global minibatch under data parallelism.

Sinkhorn's balance constraint, the per-study grouping and the propagation max are
properties of the whole minibatch, not of one device's shard. Each rank therefore gathers
every rank's anchor scores (V × B_r × K, small next to the model) and computes the SwAV
and propagation terms on the global minibatch, identically on every rank. The gather is
differentiable: its backward sums each rank's gradient for the local shard, so after DDP
averages the parameter gradients over the W ranks, the update equals that of one process
on the global minibatch (W identical copies of the loss, each contributing 1/W).
"""

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_scores(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's ``scores`` along ``dim`` in rank order, gradients kept."""
    if world_size() == 1:
        return scores
    with warnings.catch_warnings():  # deprecated for a private successor; kept for torch ≥ 2.3
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(scores)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-d integer ``labels`` (study groups) in rank order."""
    if world_size() == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)
