"""The per-cell output of a run or a query mapping: embedding.h5ad."""

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

import scproto
from scproto.api import ScProto

log = logging.getLogger(__name__)


def unique_obs_columns(obs: pd.DataFrame, written: dict[str, Any]) -> pd.DataFrame:
    """``obs`` plus the written columns; an input column of the same name holding other
    values is kept, renamed ``<name>_input``."""
    obs = obs.copy()
    for name, values in written.items():
        if name in obs and not np.array_equal(
            obs[name].astype(str), np.asarray(values).astype(str)
        ):
            log.warning(
                "input obs column %r differs from the run's and is kept as %r",
                name,
                f"{name}_input",
            )
            obs[f"{name}_input"] = obs.pop(name)
        obs[name] = values
    return obs


def embedding_anndata(
    model: ScProto,
    obs: pd.DataFrame,
    split: np.ndarray,
    latent: np.ndarray,
    *,
    query_studies: Sequence[str] = (),
) -> ad.AnnData:
    """Every cell with its input obs, ``obs['split']``, nearest prototype and similarity,
    transferred label and uncertainty (when the model has prototype labels), and
    ``obsm['X_scproto']`` (μ) with its unit-norm version."""
    prototype, similarity = model.prototype_similarity(latent)
    columns = {
        "split": pd.Categorical(split, categories=["reference", "query"]),
        "prototype": prototype,
        "prototype_similarity": similarity,
    }
    if "prototype_labels" in model.registry:
        predictions = model.label_predictions(prototype, similarity)
        columns["predicted_label"] = predictions["predicted_label"].to_numpy()
        columns["label_uncertainty"] = predictions["label_uncertainty"].to_numpy()
    embedding = ad.AnnData(obs=unique_obs_columns(obs, columns))
    embedding.obsm["X_scproto"] = latent
    norms = np.linalg.norm(latent, axis=1, keepdims=True).clip(1e-12)
    embedding.obsm["X_scproto_unit"] = latent / norms
    embedding.uns["scproto"] = {
        "batch_key": model.registry["batch_key"],
        "label_key": model.registry.get("label_key") or "",
        "query_studies": list(query_studies),
        "version": scproto.__version__,
    }
    return embedding
