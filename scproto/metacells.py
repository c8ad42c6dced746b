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

from scproto.model.module import ScProtoModule

log = logging.getLogger(__name__)


def decoding_scale(latent: np.ndarray, prototype: np.ndarray, n_prototypes: int) -> np.ndarray:
    """Norm at which to decode each prototype: the mean ‖μ‖ of the cells assigned to it.

    Prototypes are unit vectors but the decoder was trained on μ, whose norms are far from
    1; decoding a unit vector would leave the data's manifold (the original's defect).
    Empty prototypes take the mean norm of all cells.
    """
    norms = np.linalg.norm(latent, axis=1)
    total = np.bincount(prototype, weights=norms, minlength=n_prototypes)
    count = np.bincount(prototype, minlength=n_prototypes)
    return np.where(count > 0, total / np.maximum(count, 1), norms.mean())


@torch.no_grad()
def decode_prototypes(
    module: ScProtoModule, scale: np.ndarray, n_reference_studies: int, library_size: float
) -> tuple[np.ndarray, np.ndarray]:
    """(model-input expression, normalised expression), each K × genes.

    The decoder gets each prototype at ``scale`` and the mean reference study embedding.
    MSE models decode log-normalised expression; NB models decode gene proportions, given
    here at ``library_size`` counts (NB means, not samples).
    """
    module.eval()
    cvae = module.cvae
    device = module.device
    z = (
        F.normalize(module.prototypes.detach(), dim=1)
        * torch.as_tensor(scale, dtype=torch.float32, device=device)[:, None]
    )
    condition = cvae.mean_study_embedding(n_reference_studies).expand(len(z), -1)
    decoded = cvae.decode(z, condition).cpu().numpy()
    if cvae.likelihood == "nb":
        normalised = decoded * library_size
        return np.log1p(normalised), normalised
    return decoded, np.expm1(decoded)


def majority(labels: Sequence) -> tuple[str, float]:
    """Most common label and its share; ('', nan) for no labels."""
    counts = pd.Series(labels).value_counts()
    if counts.empty:
        return "", float("nan")
    return str(counts.index[0]), float(counts.iloc[0] / counts.sum())


def top_similar_labels(
    latent: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, k: int = 10
) -> tuple[list[str], np.ndarray]:
    """Majority label among the k cells most similar to each prototype, and its share."""
    unit = latent / np.linalg.norm(latent, axis=1, keepdims=True).clip(1e-12)
    similarity = prototypes @ unit.T  # K × cells
    k = min(k, unit.shape[0])
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    results = [majority(labels[rows]) for rows in nearest]
    return [r[0] for r in results], np.array([r[1] for r in results])


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / denominator


def study_columns(studies: Sequence[str]) -> list[str]:
    """``n_<study>`` column names that anndata writes: '/' (an HDF5 path separator)
    becomes '_', and names that then collide get a numeric suffix."""
    columns: list[str] = []
    for study in map(str, studies):
        column = base = f"n_{study.replace('/', '_')}"
        suffix = 1
        while column in columns:
            suffix += 1
            column = f"{base}_{suffix}"
        columns.append(column)
    renamed = {s: c for s, c in zip(map(str, studies), columns, strict=True) if c != f"n_{s}"}
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
) -> ad.AnnData:
    """The K × genes metacell AnnData with one obs row of statistics per prototype.

    ``latent``, ``x`` (model input, sparse), ``prototype``, ``studies`` and ``labels``
    describe the reference cells the statistics are computed on; with ``rows``, those are
    rows ``rows`` of ``x`` (so an atlas's model input is not copied to take them).
    """
    n_prototypes = module.hparams.n_prototypes
    prototypes = F.normalize(module.prototypes.detach(), dim=1).cpu().numpy()
    scale = decoding_scale(latent, prototype, n_prototypes)
    expression, normalised = decode_prototypes(module, scale, n_reference_studies, library_size)

    size = np.bincount(prototype, minlength=n_prototypes)
    # prototype × cell indicator, sparse: a dense one would be n_cells × K
    columns = np.arange(len(prototype)) if rows is None else np.asarray(rows)
    members = sp.csr_matrix(
        (np.ones(len(prototype), dtype=np.float32), (prototype, columns)),
        shape=(n_prototypes, x.shape[0]),
    )
    mean_x = np.asarray((members @ x).todense()) / np.maximum(size, 1)[:, None]
    obs = pd.DataFrame(index=[f"prototype_{k}" for k in range(n_prototypes)])
    obs["n_cells"] = size
    obs["is_empty"] = size == 0
    obs["decoding_norm"] = scale
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
        labels = np.asarray(pd.Series(labels).astype(object).where(pd.notna(labels), None))
        obs["label_top10"], obs["label_top10_confidence"] = top_similar_labels(
            latent, labels, prototypes
        )
        by_assigned = [majority(labels[prototype == k]) for k in range(n_prototypes)]
        obs["label_assigned"] = [label for label, _ in by_assigned]
        obs["purity"] = [share for _, share in by_assigned]

    result = ad.AnnData(
        X=expression.astype(np.float32), obs=obs, var=pd.DataFrame(index=list(genes))
    )
    result.layers["normalized"] = normalised.astype(np.float32)
    result.obsm["prototype"] = prototypes
    result.uns["decoding"] = {
        "condition": "mean of the reference study embeddings",
        "scale": "mean norm of the assigned cells' μ (all cells' mean for empty prototypes)",
        "library_size": float(library_size),
    }
    return result
