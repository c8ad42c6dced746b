"""Where prototypes start (spherical k-means of the cells) and restart (unused ones)."""

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def kmeans_prototypes(
    representations: torch.Tensor,
    n_prototypes: int,
    *,
    seed: int = 0,
    n_iters: int = 25,
    n_redo: int = 3,
) -> torch.Tensor:
    """K unit-norm centroids of the directions ẑ = μ/‖μ‖ (spherical k-means, faiss).

    Random unit vectors in the latent space mostly land where no cell is, so that after
    training most prototypes are never a cell's nearest; centroids of the cells start every
    prototype on the data. The best of ``n_redo`` runs (lowest objective) is kept. With
    fewer cells than prototypes, the remainder are random directions.
    """
    points = F.normalize(representations.detach().float(), dim=1).cpu().numpy()
    n_points, dim = points.shape
    k = min(n_prototypes, n_points)
    kmeans = faiss.Kmeans(
        dim,
        k,
        niter=n_iters,
        nredo=n_redo,
        spherical=True,
        seed=seed,
        max_points_per_centroid=256,
    )
    kmeans.train(np.ascontiguousarray(points, dtype=np.float32))
    centroids = torch.from_numpy(kmeans.centroids.copy())
    if k < n_prototypes:
        generator = torch.Generator().manual_seed(seed)
        extra = torch.randn(n_prototypes - k, dim, generator=generator)
        centroids = torch.cat([centroids, extra])
    return F.normalize(centroids, dim=1)


def reseed_unused(
    prototypes: torch.Tensor, usage: torch.Tensor, anchors: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """``prototypes`` with every row that no anchor took as its nearest (``usage == 0``)
    moved onto the direction of a distinct random anchor.

    A prototype that is no cell's nearest gets no swapped-prediction target and never comes
    back; restarting it on a cell (as k-means restarts empty clusters) puts it where cells
    are, in proportion to their density, so that large populations split into finer
    prototypes. Used prototypes are returned unchanged.
    """
    unused = torch.nonzero(usage == 0).squeeze(1)
    result = prototypes.clone()
    if unused.numel() == 0 or anchors.shape[0] == 0:
        return result
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(anchors.shape[0], generator=generator)[: unused.numel()]
    unused = unused[: picks.numel()]  # more unused prototypes than anchors: the rest wait
    result[unused] = F.normalize(anchors[picks].detach().float().cpu(), dim=1).to(result.dtype)
    return result
