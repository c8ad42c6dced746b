"""The per-cell output of a run or a query mapping: embedding.h5ad."""

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

import scproto
from scproto.api import ScProto
from scproto.metacells import prototype_names

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


def prototype_index(values) -> np.ndarray:
    """The prototype index of each cell from ``obs['prototype']``: categorical names
    (``prototype_<k>``), or the integers earlier versions wrote."""
    series = pd.Series(values)
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.astype(str).str.removeprefix("prototype_").astype(np.int64).to_numpy()
    return series.to_numpy(dtype=np.int64)


def embedding_anndata(
    model: ScProto,
    obs: pd.DataFrame,
    split: np.ndarray,
    latent: np.ndarray,
    *,
    query_studies: Sequence[str] = (),
    x=None,
) -> ad.AnnData:
    """Every cell with its input obs, ``obs['split']``, nearest prototype (categorical,
    named as the rows of metacells.h5ad) and similarity, transferred label and
    uncertainty (when the model has prototype labels), ``obsm['X_scproto']`` (μ) with its
    unit-norm version, and as X the model input ``x`` (log-normalised model genes), so
    cells can be coloured by a gene."""
    prototype, similarity = model.prototype_similarity(latent)
    names = prototype_names(model.module.hparams.n_prototypes)
    columns = {
        "split": pd.Categorical(split, categories=["reference", "query"]),
        "prototype": pd.Categorical.from_codes(prototype, categories=names),
        "prototype_similarity": similarity,
    }
    if model.registry.has_labels:
        predictions = model.label_predictions(prototype, similarity)
        columns["predicted_label"] = predictions["predicted_label"].array  # categorical
        columns["label_uncertainty"] = predictions["label_uncertainty"].to_numpy()
    embedding = ad.AnnData(
        X=x,
        obs=unique_obs_columns(obs, columns),
        var=None if x is None else pd.DataFrame(index=list(model.spec.genes)),
    )
    embedding.obsm["X_scproto"] = latent
    norms = np.linalg.norm(latent, axis=1, keepdims=True).clip(1e-12)
    embedding.obsm["X_scproto_unit"] = latent / norms
    embedding.uns["scproto"] = {
        "batch_key": model.registry.batch_key,
        "label_key": model.registry.label_key or "",
        "query_studies": list(query_studies),
        "X": "log-normalised expression of the model genes (the model input)"
        if x is not None
        else "",
        "version": scproto.__version__,
    }
    return embedding
