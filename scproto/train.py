"""`train(cfg)`: build data and model from a composed config, fit, write the run's outputs."""

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anndata as ad
import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

import scproto
from scproto.api import ScProto
from scproto.data.datamodule import ScProtoDataModule
from scproto.data.io import read_h5ad
from scproto.datasets.synthetic import make_synthetic
from scproto.errors import ScProtoInputError
from scproto.evaluation import evaluate, read_run, write_metrics
from scproto.metacells import decoding_points, metacells
from scproto.model.module import SETTING_GROUPS, ScProtoModule
from scproto.outputs import embedding_anndata
from scproto.run.checkpoint import (
    EpochCheckpoint,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from scproto.run.directory import (
    CHECKPOINT,
    EMBEDDING,
    METACELLS,
    METRICS,
    PROTOTYPES,
    SYNTHETIC_DATA,
    TRAIN_OUTPUTS,
    RunDirectory,
    atomic_path,
)
from scproto.run.hydra import exit_with_message
from scproto.run.quiet import quiet_third_party
from scproto.run.settings import CONFIG_DIR, validate_config
from scproto.tracking import (
    finish_wandb,
    join_metrics_log,
    log_config,
    log_results,
    set_aside_metrics_log,
)

log = logging.getLogger(__name__)


def load_data(data_cfg: DictConfig) -> ad.AnnData:
    """The embedded synthetic data, or the .h5ad file at ``data.path``."""
    if data_cfg.source == "synthetic":
        try:
            # the counts layer only when a setting reads it: a second copy of the data
            layers = {data_cfg.counts_layer, data_cfg.layer} - {None}
            return make_synthetic(counts_layer=bool(layers), **data_cfg.synthetic)
        except TypeError as error:  # an unknown data.synthetic.* key
            raise ScProtoInputError(f"data.synthetic: {error}.") from error
    if not data_cfg.path:
        raise ScProtoInputError(
            "`data.path` is not set: give the .h5ad file, e.g. data.path=/data/atlas.h5ad."
        )
    layers = list(dict.fromkeys(k for k in (data_cfg.layer, data_cfg.counts_layer) if k))
    return read_h5ad(data_cfg.path, layers=layers, backed=data_cfg.backed, x=data_cfg.layer is None)


def build_datamodule(cfg: DictConfig, adata: ad.AnnData, inplace: bool = True) -> ScProtoDataModule:
    """``inplace``: X may be normalised in place, for an AnnData read for this run alone
    (train.py); never for a user's object (the Python API)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("source", "path", "synthetic", "backed"):
        data.pop(key, None)
    if data["query_studies"] is None:  # the synthetic generator marks its own query studies
        data["query_studies"] = list(adata.uns.get("query_studies", []))
    if cfg.loss.lambda_geometry == 0:  # no L_geometry (loss=paper): no per-study PCA to make
        data["geometry_pcs"] = 0
    return ScProtoDataModule(
        adata,
        likelihood=cfg.model.likelihood,
        min_group_size=cfg.loss.min_group_size,
        cache_dir=cfg.paths.cache_dir,
        seed=cfg.seed,
        inplace=inplace,
        **data,
    )


def build_module(cfg: DictConfig, datamodule: ScProtoDataModule) -> ScProtoModule:
    registry = replace(datamodule.registry, scproto_version=scproto.__version__)
    return ScProtoModule(
        n_genes=len(datamodule.spec.genes),
        n_studies=len(datamodule.studies),
        n_views=cfg.data.n_views,
        **{  # model, loss and sinkhorn: every setting under its config name
            key: value
            for group in SETTING_GROUPS
            for key, value in OmegaConf.to_container(cfg[group], resolve=True).items()
        },
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        registry=registry,
    )


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    """The configured Trainer, always with the per-epoch checkpoint that resuming needs."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks.append(EpochCheckpoint(run_dir / "checkpoints"))
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # enable_checkpointing: EpochCheckpoint is the run's Checkpoint callback (Lightning adds
    # no ModelCheckpoint beside it, and refuses one when checkpointing is off)
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, enable_checkpointing=True
    )


def reference_labels(datamodule: ScProtoDataModule) -> np.ndarray | None:
    """Cell-type labels of the reference cells, or None without ``data.label_key``."""
    if not datamodule.label_key:
        return None
    return datamodule.adata.obs[datamodule.label_key].to_numpy()[datamodule.is_reference]


def store_decoding_points(model: ScProto, latent: np.ndarray) -> np.ndarray:
    """Each prototype's decoding point, the mean μ of the reference cells (``latent``) of
    highest cosine to it (:func:`decoding_points`), into the registry; returned. With
    ``model.assignment=point`` every output assigns cells by these points."""
    by_cosine, _ = model.prototype_similarity(latent, assignment="cosine")
    points = decoding_points(latent, by_cosine, model.get_prototypes())
    model.registry.prototype_points = points.tolist()
    return points


def store_prototype_points(model: ScProto, datamodule: ScProtoDataModule) -> None:
    """The decoding points and how many reference cells each prototype takes (by the
    model's assignment), into the registry, where query mapping reads which prototypes
    stand for a population."""
    reference = np.flatnonzero(datamodule.is_reference)
    latent = model.latent_of(
        datamodule.x[reference], model.study_codes(datamodule.adata)[reference]
    )
    store_decoding_points(model, latent)
    prototype, _ = model.prototype_similarity(latent)
    n_prototypes = model.module.hparams.n_prototypes
    model.registry.prototype_sizes = np.bincount(prototype, minlength=n_prototypes).tolist()


def describe_prototypes(
    model: ScProto, datamodule: ScProtoDataModule, cfg: DictConfig
) -> tuple[np.ndarray, np.ndarray | None, ad.AnnData]:
    """(every cell's μ, the reference labels, metacells.h5ad from the reference cells)
    once training is done (train.py and ``ScProto.train``); stores what inference needs
    in the registry."""
    latent = model.latent_of(datamodule.x, model.study_codes(datamodule.adata))
    reference = datamodule.is_reference
    points = None  # by cosine, the metacell table takes its members' means itself
    if model.module.hparams.assignment == "point":
        points = store_decoding_points(model, latent[reference])
    prototype, _ = model.prototype_similarity(latent)
    labels = reference_labels(datamodule)
    adata = datamodule.adata
    table = metacells(
        model.module,
        latent=latent[reference],
        x=datamodule.x,
        rows=np.flatnonzero(reference),
        prototype=prototype[reference],
        points=points,
        studies=adata.obs[datamodule.batch_key].astype(str).to_numpy()[reference],
        genes=datamodule.spec.genes,
        n_reference_studies=len(datamodule.studies),
        library_size=datamodule.spec.target_sum,
        labels=labels,
        library_sizes=datamodule.library_size,
        study_names=datamodule.studies,
    )
    model.registry.prototype_points = table.obsm["decoding_point"].tolist()
    model.registry.prototype_sizes = table.obs["n_cells"].astype(int).tolist()
    if labels is not None:
        # The cells a prototype is nearest to speak for the cells it will label; an empty
        # prototype falls back to the label of its 10 most similar cells.
        model.registry.prototype_labels = [
            None if pd.isna(label) else str(label) for label in table.obs["label"]
        ]
        model.registry.prototype_label_confidence = table.obs["label_confidence"].tolist()
        model.registry.label_categories = list(table.obs["label"].cat.categories)
    model.registry.label_uncertainty_threshold = cfg.label_transfer.uncertainty_threshold
    return latent, labels, table


def summarize_metacells(table: ad.AnnData, labels: np.ndarray | None) -> dict[str, float]:
    """Median fidelity over non-empty prototypes; share of cell types that own a prototype."""
    summary = {
        "metacells/fidelity_median": float(np.nanmedian(table.obs["fidelity"])),
        "metacells/empty_prototypes": float(table.obs["is_empty"].sum()),
    }
    if labels is not None:
        # a type owns a prototype only through a non-empty one
        types = pd.Series(labels).dropna().astype(str).unique()
        owned = set(table.obs["label"][~table.obs["is_empty"]].dropna().astype(str))
        summary["metacells/types_with_prototype_share"] = float(
            np.mean([t in owned for t in types])
        )
        summary["metacells/types_without_prototype"] = float(sum(t not in owned for t in types))
    return summary


def headline(metrics: dict[str, Any]) -> str:
    keys = ("scib/total", "pca/scib/total", "scgraph/corr_weighted", "pca/scgraph/corr_weighted")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics) or "-"


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit scProto as configured; returns (metrics, objects) and writes the run directory.

    Settings and the run directory are checked before any data is read. With
    ``ckpt_path`` the run resumes that checkpoint's training; with ``overwrite=true`` over
    an earlier run, the new outputs replace the old ones only once they are all written.
    """
    validate_config(cfg)
    directory = RunDirectory.open(
        cfg.paths.output_dir,
        outputs=TRAIN_OUTPUTS,
        overwrite=cfg.overwrite,
        resume=cfg.get("ckpt_path"),
    )
    if str(directory.write_dir) != str(cfg.paths.output_dir):  # the API path, overwriting
        cfg = copy.deepcopy(cfg)
        cfg.paths.output_dir = str(directory.write_dir)  # loggers write there too
    pl.seed_everything(cfg.seed, workers=True)

    try:
        adata = load_data(cfg.data)
        if cfg.data.source == "synthetic" and rank_zero_only.rank == 0:  # before normalising
            with atomic_path(directory.write_dir / SYNTHETIC_DATA) as path:
                adata.write_h5ad(path)
        datamodule = build_datamodule(cfg, adata)
        datamodule.setup("fit")
        module = build_module(cfg, datamodule)
        resumed = None
        if cfg.get("ckpt_path"):
            checkpoint = load_checkpoint(cfg.ckpt_path)
            check_resumable(checkpoint, module, Path(cfg.ckpt_path))
            resumed = (set_aside_metrics_log(directory.write_dir), checkpoint["global_step"])
        trainer = build_trainer(cfg, directory.write_dir)
        metrics, objects = fit_and_write(
            cfg, directory.write_dir, datamodule, module, trainer, resumed
        )
    except BaseException:
        finish_wandb(exit_code=1)  # closed also on a crash, so a sweep's next job starts clean
        if directory.staged:
            log.error(
                "this run failed; %s still holds the previous run, unchanged. This run's log "
                "and files are in %s.",
                directory.final_dir,
                directory.write_dir,
            )
        raise
    finish_wandb(exit_code=0)
    if objects["trainer"].is_global_zero:
        directory.commit()
        log.info("outputs in %s", directory.final_dir)
    return metrics, objects


def fit_and_write(
    cfg: DictConfig,
    run_dir: Path,
    datamodule: ScProtoDataModule,
    module: ScProtoModule,
    trainer: pl.Trainer,
    resumed: tuple[Path | None, int] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then (on rank 0 only) map the query studies, describe, save and evaluate.

    ``resumed``: the interrupted run's per-step log set aside, and the step resumed from.
    """
    log_config(trainer, cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    train_seconds = time.perf_counter() - start
    # The final state, whatever the checkpoint callback did (fast_dev_run disables it).
    save_checkpoint(trainer, run_dir / CHECKPOINT)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.is_global_zero:  # DDP: the run's files and evaluation are rank 0's
        return metrics, {"trainer": trainer, "datamodule": datamodule}
    if resumed is not None and resumed[0] is not None:
        join_metrics_log(run_dir, *resumed)

    model = reference_model = ScProto(module)
    if datamodule.query_studies:
        store_prototype_points(model, datamodule)  # the prototypes the query maps onto
        start = time.perf_counter()
        model = model.map_query(
            datamodule.adata, seed=cfg.seed, x=datamodule.x, counts=datamodule.counts, **cfg.query
        )
        log.info(
            "query mapping of %s: %d epochs, %.1f s, %s loss %s",
            datamodule.query_studies,
            cfg.query.epochs,
            time.perf_counter() - start,
            cfg.query.objective,
            f"{model.mapping_losses[0]:.3g} → {model.mapping_losses[-1]:.3g}"
            if model.mapping_losses
            else "-",
        )
    latent, labels, table = describe_prototypes(model, datamodule, cfg)
    model.save(run_dir / CHECKPOINT, overwrite=True)  # the model that wrote the outputs below
    with atomic_path(run_dir / METACELLS) as path:
        table.write_h5ad(path)
    with atomic_path(run_dir / PROTOTYPES) as path:
        np.save(path, model.get_prototypes())
    split = np.where(datamodule.is_reference, "reference", "query")
    embedding = embedding_anndata(
        model,
        datamodule.adata.obs,
        split,
        latent,
        query_studies=datamodule.query_studies,
        x=datamodule.x,
    )
    with atomic_path(run_dir / EMBEDDING) as path:
        embedding.write_h5ad(path)
    summary = summarize_metacells(table, labels)
    log.info("metacells: %s", ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in summary.items()))
    metrics |= summary
    metrics["time/train_s"] = train_seconds
    metrics["time/data_setup_s"] = sum(datamodule.timings.values())
    metrics["data/knn_recall"] = datamodule.knn_recall
    log.info("training took %.1f s", train_seconds)
    if cfg.eval.enabled:
        inputs = read_run(run_dir, datamodule.x, n_pcs=cfg.eval.pca_components, seed=cfg.seed)
        metrics |= evaluate(inputs, cfg.eval, run_dir, seed=cfg.seed, title=cfg.task_name)
        log.info("evaluation: %s", headline(metrics))
    write_metrics(metrics, run_dir / METRICS)
    log_results(trainer, metrics, run_dir)
    return metrics, {
        "model": model,
        "reference_model": reference_model,
        "datamodule": datamodule,
        "trainer": trainer,
        "embedding": embedding,
    }


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The number a Hydra sweeper optimises (`optimized_metric`), None when none is set."""
    if not name:
        return None
    if name not in metrics:
        raise ScProtoInputError(
            f"optimized_metric={name} is not among this run's metrics; evaluation keys such "
            "as scib/total need eval=full or eval=fast (see metrics.json for the keys)."
        )
    return metrics[name]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    try:
        metrics, objects = train(cfg)
        if not objects["trainer"].is_global_zero:
            return None  # a DDP worker: rank 0 reports the run
        return optimized_value(metrics, cfg.get("optimized_metric"))
    except ScProtoInputError as error:
        exit_with_message(error)


if __name__ == "__main__":
    main()
