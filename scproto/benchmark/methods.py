"""The methods of Table 1, each trained on the reference studies and mapping the query
studies the way its own package does (``../shared/BENCHMARK_PROTOCOL.md``).

Every method takes the same prepared AnnData (the shared HVGs: ``X`` log-normalised,
``layers['counts']`` raw counts, ``obs['split']`` reference/query) and returns the
embedding of all its cells, in order, with what it used (epochs).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from scproto.data.preprocess import randomized_pca

log = logging.getLogger(__name__)

QUERY_EPOCHS = 50  # surgery epochs for scVI and scPoli (protocol)


@dataclass
class Embedded:
    latent: np.ndarray
    epochs: str = "-"  # reference (+ query) epochs, as run
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. scProto's own label column


@dataclass(frozen=True)
class Context:
    """What a method may use besides the data: the seed, its epoch cap, a folder of its own."""

    batch_key: str
    seed: int
    max_epochs: int | None
    out_dir: Path
    prepared: Path  # the shared input as a file (scProto trains from a file, like train.py)
    scproto_config: Any = None  # the composed training config (scProto only)

    def query_epochs(self, default: int) -> int:
        """Surgery epochs: the method's own, within the cap (one budget for both stages)."""
        return min(default, self.max_epochs) if self.max_epochs else default


def pca(data: ad.AnnData, context: Context) -> Embedded:
    """50 principal components of the log-normalised HVGs of all cells."""
    return Embedded(randomized_pca(data.X, min(50, min(data.shape) - 1), seed=context.seed))


def harmony(data: ad.AnnData, context: Context) -> Embedded:
    """harmonypy on that PCA, batch = study, defaults, all cells."""
    import harmonypy

    components = pca(data, context).latent
    result = harmonypy.run_harmony(
        components, data.obs, [context.batch_key], random_state=context.seed, verbose=False
    )
    corrected = np.asarray(result.Z_corr)
    if corrected.shape[0] != data.n_obs:  # harmonypy < 2 returns components × cells
        corrected = corrected.T
    return Embedded(corrected)


def _scvi(data: ad.AnnData, context: Context, **architecture) -> Embedded:
    import scvi

    scvi.settings.seed = context.seed
    reference = data[data.obs["split"] == "reference"].copy()
    query = data[data.obs["split"] == "query"].copy()
    scvi.model.SCVI.setup_anndata(reference, layer="counts", batch_key=context.batch_key)
    model = scvi.model.SCVI(reference, n_latent=8, **architecture)
    quiet = {"accelerator": "cpu", "enable_progress_bar": False}
    model.train(max_epochs=context.max_epochs, **quiet)
    epochs = f"{len(model.history['elbo_train'])}"
    if query.n_obs:
        mapped = scvi.model.SCVI.load_query_data(query, model)
        query_epochs = context.query_epochs(QUERY_EPOCHS)
        mapped.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0}, **quiet)
        model, epochs = mapped, f"{epochs} + {query_epochs}"
    everything = data.copy()
    scvi.model.SCVI.setup_anndata(everything, layer="counts", batch_key=context.batch_key)
    return Embedded(model.get_latent_representation(everything), epochs)


def scvi_default(data: ad.AnnData, context: Context) -> Embedded:
    """scVI's default architecture (``encode_covariates=False``: surgery cannot move the
    query's latent, since the encoder does not see the study)."""
    return _scvi(data, context)


def scvi_arches(data: ad.AnnData, context: Context) -> Embedded:
    """scVI with scvi-tools' recommended surgery settings."""
    return _scvi(
        data,
        context,
        encode_covariates=True,
        use_layer_norm="both",
        use_batch_norm="none",
        n_layers=2,
        dropout_rate=0.2,
    )


def scpoli(data: ad.AnnData, context: Context) -> Embedded:
    """scPoli unsupervised (scarches), NB on counts; query by its own surgery."""
    import anndata

    anndata.read = anndata.read_h5ad  # scarches 0.6.1 still calls the removed alias
    import scarches
    import torch

    torch.manual_seed(context.seed)
    np.random.seed(context.seed)  # noqa: NPY002  (scarches draws its split from here)
    counts = ad.AnnData(X=data.layers["counts"].copy(), obs=data.obs.copy(), var=data.var.copy())
    is_reference = (counts.obs["split"] == "reference").to_numpy()
    reference, query = counts[is_reference].copy(), counts[~is_reference].copy()
    epochs = context.max_epochs or 100
    model = scarches.models.scPoli(
        adata=reference, condition_keys=context.batch_key, latent_dim=8, recon_loss="nb"
    )
    model.train(n_epochs=epochs)  # scarches' early stopping: val loss, patience 20
    used = f"≤{epochs}"
    if query.n_obs:
        model = scarches.models.scPoli.load_query_data(
            adata=query, reference_model=model, labeled_indices=[]
        )
        query_epochs = context.query_epochs(QUERY_EPOCHS)
        model.train(n_epochs=query_epochs)
        used = f"{used} + ≤{query_epochs}"
    # scarches indexes X with torch tensors, which scipy's sparse matrices refuse
    dense = ad.AnnData(X=counts.X.toarray(), obs=counts.obs, var=counts.var)
    return Embedded(np.asarray(model.get_latent(dense, mean=True)), used)


def scproto(data: ad.AnnData, context: Context) -> Embedded:
    """scProto as `python train.py` would train it on the prepared file (same genes)."""
    import copy

    from omegaconf import OmegaConf, open_dict

    from scproto.train import train

    cfg = copy.deepcopy(context.scproto_config)
    with open_dict(cfg):
        cfg.seed = context.seed
        cfg.data.source, cfg.data.path = "h5ad", str(context.prepared)
        cfg.data.synthetic = None
        cfg.data.counts_layer = "counts"
        cfg.data.n_top_genes = data.n_vars  # the shared genes, all of them
        query = data.obs.loc[data.obs["split"] == "query", context.batch_key]
        cfg.data.query_studies = sorted(set(query.astype(str)))
        cfg.eval.enabled = False  # scored by the benchmark, like every method
        cfg.paths.output_dir = str(context.out_dir / "run")
        if context.max_epochs:
            cfg.trainer.max_epochs = context.max_epochs
        cfg.query.epochs = context.query_epochs(cfg.query.epochs)
    _, objects = train(cfg)
    embedding = objects["embedding"]
    if not embedding.obs_names.equals(data.obs_names):  # the run dropped or reordered cells
        raise RuntimeError("scProto's embedding does not hold the benchmark's cells in order")
    # the harness scores the run's prototypes and metacells with this config
    extra = {"run_dir": cfg.paths.output_dir, "config": OmegaConf.to_yaml(cfg)}
    if "predicted_label" in embedding.obs:
        extra["prototype_labels"] = embedding.obs["predicted_label"].astype(str).to_numpy()
    return Embedded(
        embedding.obsm["X_scproto"], f"{cfg.trainer.max_epochs} + {cfg.query.epochs}", extra
    )


METHODS: dict[str, Callable[[ad.AnnData, Context], Embedded]] = {
    "pca": pca,
    "harmony": harmony,
    "scvi": scvi_default,
    "scvi_arches": scvi_arches,
    "scpoli": scpoli,
    "scproto": scproto,
}
