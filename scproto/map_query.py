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
from scproto.train import CONFIG_DIR, exit_with_message, prepare_run_dir

log = logging.getLogger(__name__)
OUTPUT_NAMES = ("embedding.h5ad", "checkpoints/mapped.ckpt")


def map_file(cfg: DictConfig) -> Path:
    """Map ``cfg.data.path`` onto ``cfg.ckpt``; returns the run directory it wrote."""
    if not cfg.ckpt or not cfg.data.path:
        raise ScProtoInputError("Give both the model and the data: ckpt=... data.path=...")
    run_dir = Path(cfg.paths.output_dir)
    prepare_run_dir(run_dir, cfg.overwrite, names=OUTPUT_NAMES)
    model = ScProto.load(cfg.ckpt)
    adata = read_h5ad(cfg.data.path)
    known = set(model.studies)
    mapped = model.map_query(
        adata, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed
    )
    latent = mapped.get_latent(adata)
    studies = adata.obs[model.registry["batch_key"]].astype(str).to_numpy()
    split = np.where(np.isin(studies, list(known)), "reference", "query")
    new_studies = sorted(set(studies) - known)
    embedding = embedding_anndata(mapped, adata.obs, split, latent, query_studies=new_studies)
    run_dir.mkdir(parents=True, exist_ok=True)
    embedding.write_h5ad(run_dir / "embedding.h5ad")
    mapped.save(run_dir / "checkpoints" / "mapped.ckpt")
    log.info(
        "mapped %s onto %s in %d epochs; outputs in %s", new_studies, cfg.ckpt, cfg.epochs, run_dir
    )
    return run_dir


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="map_query")
def main(cfg: DictConfig) -> None:
    try:
        map_file(cfg)
    except ScProtoInputError as error:
        exit_with_message(error)


if __name__ == "__main__":
    sys.exit(main())
