"""Metacells: prototypes decoded into batch-free expression profiles, and the prototype
table that makes them interpretable (size, labels, purity, study mix, fidelity)."""

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scproto.data import knn
from scproto.model.module import ScProtoModule

log = logging.getLogger(__name__)


def decoding_points(
    latent: np.ndarray, prototype: np.ndarray, prototypes: np.ndarray
) -> np.ndarray:
    """Where to decode each prototype (K × latent): the mean μ of the cells assigned to it.

    A prototype is a unit direction (cosine assignment), but the decoder was trained on μ,
    whose norms are far from 1; decoding a unit vector would leave the data's manifold (the
    original's defect), and even the direction rescaled to its cells' mean norm misses their
    centre, which the decoder knows best: the members' mean decodes closer to their mean
    expression and keeps markers such as TYROBP apart between NK and CD8 T prototypes.
    Empty prototypes are decoded along their direction at the mean norm of all cells.
    """
    n_prototypes, latent_dim = prototypes.shape
    count = np.bincount(prototype, minlength=n_prototypes)
    total = np.zeros((n_prototypes, latent_dim))
    np.add.at(total, prototype, latent)
    unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True).clip(1e-12)
    fallback = unit * np.linalg.norm(latent, axis=1).mean()
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], fallback)


@torch.no_grad()
def decode_prototypes(
    module: ScProtoModule,
    points: np.ndarray,
    n_reference_studies: int,
    library_size: float,
    study: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(model-input expression, normalised expression), each K × genes.

    The decoder gets each prototype's decoding point (:func:`decoding_points`) and the mean
    reference study embedding (or that of study index ``study``: the prototype as that study
    would measure it). MSE models decode log-normalised expression; NB models decode gene
    proportions, given here at ``library_size`` counts (NB means, not samples).
    """
    module.eval()
    cvae = module.cvae
    device = module.device
    z = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device)
    codes = None
    if study is None:
        condition = cvae.mean_study_embedding(n_reference_studies)
    else:
        codes = torch.full((len(z),), study, device=device)
        condition = cvae.study_embedding(codes[:1])[0]
    decoded = cvae.decode(z, condition.expand(len(z), -1), codes).cpu().numpy()
    if cvae.likelihood == "nb":
        normalised = decoded * library_size
        return np.log1p(normalised), normalised
    return decoded, np.expm1(decoded)


MEMBER_BLOCK_ROWS = 131_072  # cells summed at a time: bounds the expm1 copy of the input


def member_sums(
    members: sp.csr_matrix, x, library_sizes: np.ndarray | None, target_sum: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per prototype, the summed normalised expression (expm1 of the log input) of its
    member cells, and their summed raw counts (recovered exactly from the input and each
    cell's library size: counts = expm1(x) · library / target_sum), in blocks of cells."""
    members = members.tocsc()  # sliced by cells below
    normalised = np.zeros((members.shape[0], x.shape[1]), dtype=np.float64)
    counts = None if library_sizes is None else np.zeros_like(normalised)
    for start in range(0, x.shape[0], MEMBER_BLOCK_ROWS):
        stop = min(start + MEMBER_BLOCK_ROWS, x.shape[0])
        block = members[:, start:stop]
        if block.nnz == 0:
            continue
        values = x[start:stop].copy()
        values.data = np.expm1(values.data)
        normalised += np.asarray((block @ values).todense())
        if counts is not None:
            per_cell = library_sizes[start:stop] / target_sum
            values.data = np.round(values.data * np.repeat(per_cell, np.diff(values.indptr)))
            counts += np.asarray((block @ values).todense())
    return normalised, counts


def label_categories(labels) -> list[str]:
    """The label categories of the input (its own order when categorical), as strings."""
    series = pd.Series(labels)
    if isinstance(series.dtype, pd.CategoricalDtype):
        return [str(c) for c in series.cat.categories]
    return sorted(series.dropna().astype(str).unique())


def majority(labels: Sequence) -> tuple[str, float]:
    """Most common label and its share; ('', nan) for no labels."""
    counts = pd.Series(labels).value_counts()
    if counts.empty:
        return "", float("nan")
    return str(counts.index[0]), float(counts.iloc[0] / counts.sum())


SIMILARITY_BLOCK_ENTRIES = 1 << 24  # prototype × cell similarities held at a time


def most_similar_cells(prototypes: np.ndarray, unit: np.ndarray, k: int) -> np.ndarray:
    """Indices (K × k, unordered) of the k unit-norm cells most similar to each prototype.

    Prototypes are taken in blocks: K × cells similarities (and their int64 argpartition)
    would be 35 GB for the HLCA's 5,000 prototypes and 585k cells."""
    k = min(k, unit.shape[0])
    block = max(1, SIMILARITY_BLOCK_ENTRIES // unit.shape[0])
    return np.concatenate(
        [
            np.argpartition(-(prototypes[start : start + block] @ unit.T), k - 1, axis=1)[:, :k]
            for start in range(0, len(prototypes), block)
        ]
    )


def nearest_rows(queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Indices (queries × k, nearest first) of the k ``rows`` nearest (Euclidean, exact) to
    each query; k is capped at the number of rows."""
    index = knn.build_index(
        np.ascontiguousarray(rows, dtype=np.float32), kind="exact", seed=0, nprobe=1
    )
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return knn.search(index, queries, min(k, len(rows)))[1]


def top_similar_labels(
    latent: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    k: int = 10,
    points: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Majority label among the k cells most similar to each prototype, and its share:
    of highest cosine, or with ``points`` (cells assigned by their nearest point) the k
    cells nearest to each prototype's point."""
    if points is not None:
        nearest = nearest_rows(points, latent, k)
    else:
        unit = latent / np.linalg.norm(latent, axis=1, keepdims=True).clip(1e-12)
        nearest = most_similar_cells(prototypes, unit, k)
    results = [majority(labels[rows]) for rows in nearest]
    return [r[0] for r in results], np.array([r[1] for r in results])


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / denominator


def prototype_names(n_prototypes: int) -> list[str]:
    """The names of prototypes in every output: metacells.h5ad's rows, obs['prototype']."""
    return [f"prototype_{k}" for k in range(n_prototypes)]


def study_columns(studies: Sequence[str], prefix: str = "n_") -> list[str]:
    """``<prefix><study>`` names (obs columns, layers) that anndata writes: '/' (an HDF5
    path separator) becomes '_', and names that then collide get a numeric suffix."""
    columns: list[str] = []
    for study in map(str, studies):
        column = base = f"{prefix}{study.replace('/', '_')}"
        suffix = 1
        while column in columns:
            suffix += 1
            column = f"{base}_{suffix}"
        columns.append(column)
    renamed = {s: c for s, c in zip(map(str, studies), columns, strict=True) if c != f"{prefix}{s}"}
    if renamed:
        log.warning("metacell columns of studies whose names anndata cannot store: %s", renamed)
    return columns


def metacells(
    module: ScProtoModule,
    *,
    latent: np.ndarray,
    x,
    prototype: np.ndarray,
    studies: np.ndarray,
    genes: Sequence[str],
    n_reference_studies: int,
    library_size: float,
    labels: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    library_sizes: np.ndarray | None = None,
    study_names: Sequence[str] = (),
    points: np.ndarray | None = None,
) -> ad.AnnData:
    """The K × genes metacell AnnData with one obs row of statistics per prototype.

    ``latent``, ``x`` (model input, sparse), ``prototype``, ``studies`` and ``labels``
    describe the reference cells the statistics are computed on; with ``rows``, those are
    rows ``rows`` of ``x`` (so an atlas's model input is not copied to take them).
    ``library_sizes``: every row's raw library size when the input was counts (then the
    members' counts are summed too); ``study_names``: the model's reference studies, each
    of which gets its decoded profile. ``points``: the decoding points when ``prototype``
    is each cell's nearest one (``model.assignment=point``); None: ``prototype`` is the
    prototype of highest cosine, and each is decoded at its members' mean μ.

    X holds the decoded profiles (model input space), ``layers['normalized']`` them
    normalised; beside them the members' pseudobulk: ``layers['members_normalized']``
    (mean normalised expression, comparable with 'normalized'), and with library sizes
    ``layers['members_counts']`` (summed counts) and ``layers['members_counts_mean']``;
    ``layers['normalized_<study>']`` each prototype decoded with that study's embedding.
    Labels are categorical with the input's categories; an empty prototype's
    ``label_assigned`` and ``purity`` are missing, and ``label`` (the one label transfer
    uses) falls back to ``label_top10``.
    """
    n_prototypes = module.hparams.n_prototypes
    prototypes = F.normalize(module.prototypes.detach(), dim=1).cpu().numpy()
    assigned_by_point = points is not None
    if not assigned_by_point:
        points = decoding_points(latent, prototype, prototypes)
    expression, normalised = decode_prototypes(module, points, n_reference_studies, library_size)

    size = np.bincount(prototype, minlength=n_prototypes)
    # prototype × cell indicator, sparse: a dense one would be n_cells × K
    columns = np.arange(len(prototype)) if rows is None else np.asarray(rows)
    members = sp.csr_matrix(
        (np.ones(len(prototype), dtype=np.float32), (prototype, columns)),
        shape=(n_prototypes, x.shape[0]),
    )
    mean_x = np.asarray((members @ x).todense()) / np.maximum(size, 1)[:, None]
    normalised_sum, counts_sum = member_sums(members, x, library_sizes, library_size)
    obs = pd.DataFrame(index=prototype_names(n_prototypes))
    obs["n_cells"] = size
    obs["is_empty"] = size == 0
    obs["decoding_norm"] = np.linalg.norm(points, axis=1)
    obs["fidelity"] = np.where(size > 0, pearson_rows(expression, np.asarray(mean_x)), np.nan)

    composition = pd.crosstab(
        pd.Categorical(prototype, categories=range(n_prototypes)), studies, dropna=False
    )
    for study, column in zip(composition.columns, study_columns(composition.columns), strict=True):
        obs[column] = composition[study].to_numpy()
    share = composition.to_numpy() / np.maximum(size, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), axis=1)
    obs["study_entropy"] = np.where(size > 0, entropy, np.nan)

    if labels is not None:
        categories = label_categories(labels)
        labels = np.asarray(pd.Series(labels).astype(object).where(pd.notna(labels), None))
        top10, obs["label_top10_confidence"] = top_similar_labels(
            latent, labels, prototypes, points=points if assigned_by_point else None
        )
        by_assigned = [majority(labels[prototype == k]) for k in range(n_prototypes)]
        assigned = [label or None for label, _ in by_assigned]
        obs["label_assigned"] = pd.Categorical(assigned, categories=categories)
        obs["purity"] = [share for _, share in by_assigned]
        obs["label_top10"] = pd.Categorical([t or None for t in top10], categories=categories)
        # the label label transfer uses: the members' majority, else the 10 nearest cells'
        obs["label"] = obs["label_assigned"].where(~obs["is_empty"], obs["label_top10"])
        obs["label_confidence"] = obs["purity"].where(
            ~obs["is_empty"], obs["label_top10_confidence"]
        )

    result = ad.AnnData(
        X=expression.astype(np.float32), obs=obs, var=pd.DataFrame(index=list(genes))
    )
    result.layers["normalized"] = normalised.astype(np.float32)
    denominator = np.maximum(size, 1)[:, None]
    result.layers["members_normalized"] = (normalised_sum / denominator).astype(np.float32)
    if counts_sum is not None:
        result.layers["members_counts"] = counts_sum.astype(np.float32)
        result.layers["members_counts_mean"] = (counts_sum / denominator).astype(np.float32)
    for index, layer in enumerate(study_columns(study_names, prefix="normalized_")):
        per_study = decode_prototypes(module, points, n_reference_studies, library_size, index)
        result.layers[layer] = per_study[1].astype(np.float32)
    result.obsm["prototype"] = prototypes
    result.obsm["decoding_point"] = points.astype(np.float32)
    result.uns["decoding"] = {
        "condition": "mean of the reference study embeddings",
        "point": "mean μ of the cells of highest cosine to the prototype (none: the prototype "
        "at all cells' mean norm)",
        "assignment": "nearest point" if assigned_by_point else "highest cosine",
        "library_size": float(library_size),
    }
    return result
