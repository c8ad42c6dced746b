"""Optimisers and the learning-rate schedule of the authors' setting."""

import math
from collections.abc import Iterable

import torch

from scproto.errors import ScProtoInputError


class LARS(torch.optim.SGD):
    """SGD whose per-tensor step is scaled by a layer-wise trust ratio (You et al. 2017).

    As in SwAV's use of apex' LARC (clip=False): weight decay is folded into the gradient,
    which is then multiplied by η‖w‖ / (‖g‖ + wd‖w‖) before the SGD-with-momentum update.
    torch has no LARS; this is that wrapper and nothing more.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group["lars_weight_decay"] = weight_decay
        self.trust_coefficient = trust_coefficient
        self.eps = eps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group["lars_weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm, grad_norm = p.norm(), p.grad.norm()
                if param_norm > 0 and grad_norm > 0:
                    trust_ratio = (
                        self.trust_coefficient
                        * param_norm
                        / (grad_norm + weight_decay * param_norm + self.eps)
                    )
                    p.grad.add_(p, alpha=weight_decay).mul_(trust_ratio)
        super().step()
        return loss


def warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, final_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier: linear warm-up from 0, then cosine decay to ``final_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params, name: str, lr: float, **kwargs) -> torch.optim.Optimizer:
    """``name`` is ``lars`` (authors' LARS-SGD) or ``adam``."""
    if name == "lars":
        return LARS(params, lr=lr, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kwargs)
    raise ScProtoInputError(f"optimizer.name must be 'lars' or 'adam', got {name!r}")
