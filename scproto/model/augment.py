"""View augmentation: a simulated study effect on each view's expression."""

import torch


def gene_scale_augmentation(
    x: torch.Tensor, n_views: int, sd: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """log1p(expm1(x) · exp(f_v)) for view-major rows x (V·B × genes, log1p expression).

    f_v ~ N(0, sd²) per gene, one vector per view v: the views of a cell then differ by a
    gene-wise scale, the form of a study effect, while the cells of one view keep their
    relative expression (a subtype told apart by few genes stays told apart). Zeros stay
    zero; ``sd`` 0 returns ``x`` itself.
    """
    if sd == 0:
        return x
    factors = torch.randn(
        n_views, 1, x.shape[-1], generator=generator, device=x.device, dtype=x.dtype
    )
    scaled = torch.expm1(x).view(n_views, -1, x.shape[-1]) * torch.exp(sd * factors)
    return torch.log1p(scaled).view_as(x)
