"""Query mapping by scArches surgery: new studies get new rows in the study embedding
(and the NB dispersion); every other parameter is frozen and only those rows train, on
the query cells, with the CVAE loss."""

import copy

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import trange

from scproto.data.views import dense_rows
from scproto.model.module import ScProtoModule


def expand_studies(module: ScProtoModule, new_studies: list[str]) -> ScProtoModule:
    """A copy of ``module`` with rows for ``new_studies`` and all other parameters frozen.

    New rows start at the mean of the reference rows, the embedding an unseen study gets
    without surgery, so zero mapping epochs reproduces that encoding (the original drew
    them at random and trained them for zero epochs).
    """
    module = copy.deepcopy(module)
    cvae = module.cvae
    old = cvae.study_embedding
    n_old, n_new = old.num_embeddings, len(new_studies)
    expanded = nn.Embedding(n_old + n_new, old.embedding_dim, max_norm=old.max_norm)
    with torch.no_grad():
        expanded.weight[:n_old] = old.weight
        expanded.weight[n_old:] = cvae.mean_study_embedding()
    cvae.study_embedding = expanded
    if cvae.likelihood == "nb":
        theta = cvae.log_theta.detach()
        cvae.log_theta = nn.Parameter(
            torch.cat([theta, theta.mean(0, keepdim=True).expand(n_new, -1)])
        )

    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for parameter in new_row_parameters(module):
        parameter.requires_grad_(True)
        # only the rows of the new studies may move
        mask = torch.zeros_like(parameter)
        mask[n_old:] = 1.0
        parameter.register_hook(lambda grad, mask=mask: grad * mask)
    module.hparams["n_studies"] = n_old + n_new
    module.registry = module.registry.with_studies(new_studies)
    return module


def new_row_parameters(module: ScProtoModule) -> list[nn.Parameter]:
    cvae = module.cvae
    return [cvae.study_embedding.weight] + ([cvae.log_theta] if cvae.likelihood == "nb" else [])


def train_new_rows(
    module: ScProtoModule,
    x: sp.csr_matrix,
    study: np.ndarray,
    counts: sp.csr_matrix | None = None,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 1024,
    seed: int = 0,
    cells: np.ndarray | None = None,
) -> list[float]:
    """Adam on L_cvae = recon + kl_weight·KL over the query cells; returns the epoch losses.

    ``cells``: the rows of ``x``, ``study`` and ``counts`` that are query cells (all by
    default), so an atlas's model input is not copied to take them."""
    cells = np.arange(x.shape[0]) if cells is None else np.asarray(cells)
    optimizer = torch.optim.Adam(new_row_parameters(module), lr=lr)
    torch.manual_seed(seed)  # the reparameterisation noise and dropout
    rng = np.random.default_rng(seed)
    kl_weight = module.hparams.kl_weight
    device = module.device
    losses = []
    module.train()
    for _ in trange(epochs, desc="query mapping", leave=False, disable=epochs == 0):
        order = rng.permutation(len(cells))
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = cells[order[start : start + batch_size]]
            xb = torch.from_numpy(dense_rows(x, rows)).to(device)
            sb = torch.from_numpy(study[rows]).to(device)
            cb = None if counts is None else torch.from_numpy(dense_rows(counts, rows)).to(device)
            loss = module.cvae.loss(xb, sb, module.cvae(xb, sb), cb, kl_weight=kl_weight)["cvae"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(total / len(order))
    module.eval()
    return losses
