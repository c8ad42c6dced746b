"""`python -m scproto.map_query ckpt=... data.path=...`: map new studies onto a saved model."""

import logging
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from scproto.api import ScProto
from scproto.data.io import read_h5ad
from scproto.errors import ScProtoInputError
from scproto.outputs import embedding_anndata
from scproto.run.directory import (
    EMBEDDING,
    MAP_QUERY_OUTPUTS,
    MAPPED_CHECKPOINT,
    RunDirectory,
    atomic_path,
    refuse_training_run,
)
from scproto.run.hydra import exit_with_message
from scproto.run.quiet import quiet_third_party
from scproto.run.settings import CONFIG_DIR

log = logging.getLogger(__name__)


def map_file(cfg: DictConfig) -> Path:
    """Map ``cfg.data.path`` onto ``cfg.ckpt``; returns the run directory it wrote."""
    if not cfg.ckpt or not cfg.data.path:
        raise ScProtoInputError("Give both the model and the data: ckpt=... data.path=...")
    refuse_training_run(Path(cfg.paths.output_dir))
    directory = RunDirectory.open(
        cfg.paths.output_dir, outputs=MAP_QUERY_OUTPUTS, overwrite=cfg.overwrite
    )
    model = ScProto.load(cfg.ckpt)
    adata = read_h5ad(cfg.data.path)
    known = set(model.studies)
    mapped = model.map_query(
        adata,
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        objective=cfg.objective,
        study_shift=cfg.study_shift,
        targets=cfg.targets,
        mnn_neighbors=cfg.mnn_neighbors,
    )
    x = mapped.model_input(adata)
    latent = mapped.latent_of(x, mapped.study_codes(adata))
    studies = adata.obs[model.registry.batch_key].astype(str).to_numpy()
    split = np.where(np.isin(studies, list(known)), "reference", "query")
    new_studies = sorted(set(studies) - known)
    embedding = embedding_anndata(mapped, adata.obs, split, latent, query_studies=new_studies, x=x)
    run_dir = directory.write_dir
    with atomic_path(run_dir / EMBEDDING) as path:
        embedding.write_h5ad(path)
    mapped.save(run_dir / MAPPED_CHECKPOINT, overwrite=True)
    directory.commit()
    if new_studies:
        log.info(
            "mapped %s onto %s in %d epochs; outputs in %s",
            new_studies,
            cfg.ckpt,
            cfg.epochs,
            directory.final_dir,
        )
    else:
        log.info(
            "every study of %s is known to %s: nothing was trained, the cells are embedded "
            "with their own studies' rows; outputs in %s",
            cfg.data.path,
            cfg.ckpt,
            directory.final_dir,
        )
    return directory.final_dir


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="map_query")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    try:
        map_file(cfg)
    except ScProtoInputError as error:
        exit_with_message(error)


if __name__ == "__main__":
    sys.exit(main())
