"""Query mapping by scArches surgery: new studies get new rows in the study embedding
(and the NB dispersion) and, with ``study_shift``, a free shift of each conditioned
layer; every other parameter is frozen and only those rows train, on the query cells.

The ``scproto`` objective trains them with the training loss itself, on views built from
the query cells as training built them from the reference: SwAV within each new study
(Sinkhorn over the frozen prototypes), propagation, L_cvae and L_geometry on the study's
own PCA. With reference cells at hand and ``mnn_neighbors`` > 0, the reference cells join
as anchors and views, and a query cell's views also reach its mutual nearest reference
cells: SwAV then asks the pair to agree, with the reference cell's code made as training
made it (Sinkhorn within its own study, by the frozen model). The ``cvae`` objective is
scArches' (L_cvae alone), which only asks the new study to be reconstructed, not to land
where the reference put the same cells.
"""

import copy
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import trange

from scproto.data import graph, knn
from scproto.data.views import ViewBatchSampler, ViewRows, dense_rows, neighbor_probabilities
from scproto.model.module import ScProtoModule
from scproto.run.settings import check_choice, group_defaults

Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]  # epoch → its minibatches


def expand_studies(
    module: ScProtoModule, new_studies: list[str], study_shift: bool = True
) -> ScProtoModule:
    """A copy of ``module`` with rows for ``new_studies`` and all other parameters frozen.

    New rows start at the mean of the reference rows (and at no shift), the embedding an
    unseen study gets without surgery, so zero mapping epochs reproduces that encoding (the
    original drew them at random and trained them for zero epochs).
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
    if study_shift or cvae.has_study_shifts:  # a mapped model's shifts keep their rows
        cvae.add_study_shifts()
    if cvae.likelihood == "nb":
        theta = cvae.log_theta.detach()
        cvae.log_theta = nn.Parameter(
            torch.cat([theta, theta.mean(0, keepdim=True).expand(n_new, -1)])
        )

    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for parameter in new_row_parameters(module, study_shift):
        parameter.requires_grad_(True)
        # only the rows of the new studies may move
        mask = torch.zeros_like(parameter)
        mask[n_old:] = 1.0
        parameter.register_hook(lambda grad, mask=mask: grad * mask)
    module.hparams["n_studies"] = n_old + n_new
    module.registry = module.registry.with_studies(new_studies)
    return module


def mapping_targets(module: ScProtoModule, choice: str) -> np.ndarray | None:
    """Indices of the prototypes the query's SwAV codes may use: ``populated``, those some
    reference cell is nearest to (a prototype no reference cell took stands for no
    population, yet a balanced Sinkhorn would fill it with query cells); ``all`` (None):
    every prototype."""
    check_choice("query.targets", choice)
    if choice == "all":
        return None
    sizes = module.registry.prototype_sizes if module.registry else None
    if sizes is None:
        warnings.warn(
            "this model was saved without its prototypes' reference sizes (by an earlier scproto): "
            "the query's codes may use every prototype, as with query.targets=all",
            stacklevel=3,
        )
        return None
    return np.flatnonzero(np.asarray(sizes) > 0)


def new_row_parameters(module: ScProtoModule, study_shift: bool = False) -> list[nn.Parameter]:
    cvae = module.cvae
    parameters = [cvae.study_embedding.weight]
    if study_shift:
        parameters += [cvae.encoder.study_shift.weight, cvae.decoder.study_shift.weight]
    return parameters + ([cvae.log_theta] if cvae.likelihood == "nb" else [])


@dataclass
class QueryViews:
    """The kNN graph and per-study PCA (None when L_geometry is off) of the mapping's
    cells, built as training built the reference's. ``cells``: their rows of the model
    input, the ``n_query`` query cells first (then any reference cells); ``neighbors``
    holds positions in ``cells``."""

    cells: np.ndarray
    n_query: int
    neighbors: np.ndarray
    distances: np.ndarray
    pca: np.ndarray | None
    weighting: str = "uniform"


def query_views(
    x: sp.csr_matrix,
    cells: np.ndarray,
    study: np.ndarray,
    settings: dict[str, Any] | None,
    *,
    with_geometry: bool,
    seed: int = 0,
    reference: np.ndarray | None = None,
    mnn_neighbors: int = 0,
) -> QueryViews:
    """Views of the query cells ``x[cells]``: one kNN graph over all of them (as over all
    reference cells in training) and, ``with_geometry``, each study's own PCA.
    ``settings``: the model's ``registry.view_settings`` (the data config's defaults for
    models saved before it).

    ``reference`` (rows of reference cells) with ``mnn_neighbors`` = k > 0: the graph and
    the PCA take the query and reference cells together, and each list gains
    ``mnn_slots`` columns of mutual nearest neighbours in other studies, the reference's
    included (:func:`graph.pca_neighbors`; this k replaces the training's
    ``mnn_neighbors``)."""
    saved_before_scaling = settings is not None and "pca_scaling" not in settings
    settings = {**group_defaults("data"), **(settings or {})}
    if saved_before_scaling:  # a model saved before data.pca_scaling: its graph was unscaled
        settings["pca_scaling"] = "none"
    paired = reference is not None and len(reference) > 0 and mnn_neighbors > 0
    n_query = len(cells)
    if paired:
        cells = np.concatenate([cells, reference])
    else:
        mnn_neighbors = settings["mnn_neighbors"]
    kind = knn.index_kind("auto", len(cells), settings["knn_approximate_above"])
    neighbors, distances, _ = graph.pca_neighbors(
        x,
        cells,
        n_pcs=settings["n_pcs"],
        n_neighbors=settings["n_neighbors"],
        kind=kind,
        seed=seed,
        pca_max_cells=settings["pca_max_cells"],
        groups=study[cells],
        mnn_neighbors=mnn_neighbors,
        mnn_slots=settings["mnn_slots"],
        scaling=settings["pca_scaling"],
    )
    pca = None
    if with_geometry:
        pca = graph.study_pca(
            x,
            cells,
            study[cells],
            n_components=settings["geometry_pcs"],
            smoothing=settings["geometry_smoothing"],
            seed=seed,
            pca_max_cells=settings["pca_max_cells"],
            approximate_above=settings["knn_approximate_above"],
        )
    return QueryViews(cells, n_query, neighbors, distances, pca, settings["neighbor_weighting"])


def train_new_rows(
    module: ScProtoModule,
    x: sp.csr_matrix,
    study: np.ndarray,
    counts: sp.csr_matrix | None = None,
    *,
    objective: str = "scproto",
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 512,
    seed: int = 0,
    cells: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    mnn_neighbors: int = 0,
) -> list[float]:
    """Adam on the new studies' rows (the parameters :func:`expand_studies` left trainable)
    over the query cells; returns the epoch losses.

    ``objective``: ``scproto`` (the training loss on the query cells' views, ``batch_size``
    anchors per step) or ``cvae`` (recon + kl_weight·KL, ``batch_size`` cells per step).
    ``cells``: the rows of ``x``, ``study`` and ``counts`` that are query cells (all by
    default), so an atlas's model input is not copied to take them. ``targets``: the
    prototypes the SwAV codes may use (:func:`mapping_targets`; None: all). ``reference``,
    ``mnn_neighbors``: rows of reference cells that join as anchors and views, paired with
    the query cells by mutual nearest neighbours (:func:`query_views`)."""
    check_choice("query.objective", objective)
    cells = np.arange(x.shape[0]) if cells is None else np.asarray(cells)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    torch.manual_seed(seed)  # the reparameterisation noise and dropout
    if objective == "scproto":
        views = query_views(
            x,
            cells,
            study,
            module.registry.view_settings if module.registry else None,
            with_geometry=module.hparams.lambda_geometry > 0,
            seed=seed,
            reference=reference,
            mnn_neighbors=mnn_neighbors,
        )
        batches = view_batches(views, x, study, counts, batch_size, module, seed)
        if targets is not None:
            targets = torch.as_tensor(targets, device=module.device)
    else:
        batches = cell_batches(x, study, counts, cells, batch_size, seed)
    losses = []
    module.train()
    for epoch in trange(epochs, desc="query mapping", leave=False, disable=epochs == 0):
        total, n_batches = 0.0, 0
        for batch in batches(epoch):
            batch = {k: v.to(module.device) for k, v in batch.items()}
            if objective == "scproto":
                loss = module.compute_losses(batch, during_fit=False, targets=targets)["loss"]
            else:
                outputs = module.cvae(batch["x"], batch["study"])
                loss = module.cvae.loss(
                    batch["x"],
                    batch["study"],
                    outputs,
                    batch.get("counts"),
                    kl_weight=module.hparams.kl_weight,
                )["cvae"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, n_batches = total + loss.item(), n_batches + 1
        losses.append(total / max(n_batches, 1))
    module.eval()
    return losses


def view_batches(
    views: QueryViews,
    x: sp.csr_matrix,
    study: np.ndarray,
    counts: sp.csr_matrix | None,
    batch_size: int,
    module: ScProtoModule,
    seed: int,
) -> Batches:
    """Epoch → minibatches of ``module.hparams.n_views`` views of anchors. An epoch is as
    many steps as the query cells alone make, whatever the reference cells added: its
    anchors are a random draw from all of them."""
    rows = ViewRows(x, study, counts, cells=views.cells, pca=views.pca)
    batch_size = min(batch_size, len(views.cells))
    steps = max(1, views.n_query // batch_size)
    sampler = ViewBatchSampler(
        views.neighbors,
        batch_size=batch_size,
        n_views=module.hparams.n_views,
        seed=seed,
        probabilities=neighbor_probabilities(views.distances, views.weighting),
    )

    def epoch_batches(epoch: int):
        sampler.set_epoch(epoch)
        for indices in itertools.islice(sampler, steps):
            yield rows.__getitems__(indices)

    return epoch_batches


def cell_batches(
    x: sp.csr_matrix,
    study: np.ndarray,
    counts: sp.csr_matrix | None,
    cells: np.ndarray,
    batch_size: int,
    seed: int,
) -> Batches:
    """Epoch → minibatches of query cells, reshuffled each epoch."""
    rng = np.random.default_rng(seed)

    def epoch_batches(epoch: int):
        order = rng.permutation(len(cells))
        for start in range(0, len(order), batch_size):
            rows = cells[order[start : start + batch_size]]
            batch = {
                "x": torch.from_numpy(dense_rows(x, rows)),
                "study": torch.from_numpy(study[rows]),
            }
            if counts is not None:
                batch["counts"] = torch.from_numpy(dense_rows(counts, rows))
            yield batch

    return epoch_batches
