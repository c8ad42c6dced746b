"""Datasets that come with scproto: the synthetic multi-study data (no download)."""

import anndata as ad
from omegaconf import OmegaConf

from scproto.datasets.synthetic import TAXONOMIES, make_synthetic
from scproto.run.settings import CONFIG_DIR

__all__ = ["TAXONOMIES", "make_synthetic", "synthetic"]


def synthetic(**settings) -> ad.AnnData:
    """The data of the default run (``python train.py`` with no arguments).

    6,000 cells × 2,000 genes from 4 studies, the last one marked ``obs['split'] ==
    'query'`` (and listed in ``uns['query_studies']``); raw counts in X and in
    ``layers['counts']``, the study in ``obs['study']``, the cell type in
    ``obs['cell_type']``. Keywords override :func:`make_synthetic`'s settings; the
    defaults are those of ``configs/data/synthetic.yaml``.

    >>> adata = scproto.datasets.synthetic()
    >>> big = scproto.datasets.synthetic(n_cells=30_000, taxonomy="immune_atlas")
    """
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml"))
    return make_synthetic(**{**defaults["synthetic"], **settings})
