"""LightningDataModule: validate → log-normalise → HVGs → PCA → kNN graph → neighbour views.

X in memory is prepared as one matrix; X left in its file (``read_h5ad(..., backed=True)``)
is scanned and prepared a block of rows at a time (:mod:`scproto.data.backed`), through
the same functions.
"""

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from scproto.data import backed, graph, knn
from scproto.data.io import (
    matrix_values,
    validate_anndata,
    without_empty_cells_and_genes,
)
from scproto.data.preprocess import (
    HVG_MAX_CELLS,
    PCA_MAX_CELLS,
    InputSpec,
    as_csr32,
    highly_variable_genes,
    log_normalized,
    looks_like_counts,
    select_genes,
    source_matrix,
)
from scproto.data.views import ViewBatchSampler, ViewRows, identity_collate, neighbor_probabilities
from scproto.errors import ScProtoInputError
from scproto.registry import Registry
from scproto.run.settings import check_choice
from scproto.timing import timed

log = logging.getLogger(__name__)


class ScProtoDataModule(pl.LightningDataModule):
    """Holds one AnnData of reference and query studies and serves minibatches of views.

    Only reference cells are trained on; query studies are embedded afterwards.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        batch_key: str,
        label_key: str | None = None,
        layer: str | None = None,
        counts_layer: str | None = None,
        query_studies: Sequence[str] = (),
        n_top_genes: int = 4000,
        min_genes: int = 50,
        hvg_flavor: str = "seurat",
        hvg_max_cells: int | None = HVG_MAX_CELLS,
        target_sum: float = 1e4,
        n_pcs: int = 50,
        geometry_pcs: int = 10,
        geometry_smoothing: int = 0,
        n_neighbors: int = 15,
        mnn_neighbors: int = 0,
        mnn_slots: int = 5,
        pca_scaling: str = "study",
        pca_max_cells: int | None = PCA_MAX_CELLS,
        knn_index: str = "auto",
        knn_approximate_above: int | None = 200_000,
        knn_nprobe: int = 16,
        knn_min_recall: float = 0.95,
        n_views: int = 8,
        batch_size: int = 1024,
        neighbor_weighting: str = "uniform",
        min_cells_per_study: int = 20,
        min_group_size: int = 16,
        likelihood: str = "mse",
        num_workers: int = 0,
        cache_dir: str | Path | None = None,
        seed: int = 31,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        if layer is not None:  # the layer stands in for X (no copy): every step reads X
            if layer not in adata.layers:
                raise ScProtoInputError(
                    f"layers[{layer!r}] (the layer to train on, data.layer) is not in the data; "
                    f"layers present: {list(adata.layers.keys()) or 'none'}. Set it to one of "
                    "them, or to null for X."
                )
            adata = ad.AnnData(
                X=adata.layers[layer], obs=adata.obs, var=adata.var, layers=dict(adata.layers)
            )
        if isinstance(query_studies, str):  # data.query_studies=Freytag, not a list of letters
            query_studies = [query_studies]
        self.query_studies = [str(s) for s in query_studies]
        self.timings: dict[str, float] = {}
        validate = functools.partial(
            validate_anndata,
            batch_key=batch_key,
            label_key=label_key,
            query_studies=self.query_studies,
            n_neighbors=n_neighbors,
            min_cells_per_study=min_cells_per_study,
        )
        # X still in its file: one pass checks the values and counts the empty cells and
        # genes; self.adata then holds obs and var only, self.source the file's matrices.
        self.source, self.source_cells, self.scan = None, None, None
        if backed.on_disk(adata.X):
            validate(adata, counts_layer=counts_layer, check_values=False)  # before the pass
            adata = self._scan_source(adata, counts_layer, min_genes)
            validate(adata, counts_layer=None, check_values=False)  # less its empty cells
        else:
            adata = without_empty_cells_and_genes(adata, min_genes=min_genes, inplace=inplace)
            validate(adata, counts_layer=counts_layer)
        if n_top_genes > adata.n_vars:
            log.warning(
                "data.n_top_genes=%d exceeds the %d genes with expression: all of them are used",
                n_top_genes,
                adata.n_vars,
            )
        self.adata = adata
        self.batch_key, self.label_key = batch_key, label_key
        self.counts_layer = counts_layer
        self.n_top_genes, self.hvg_flavor, self.target_sum = n_top_genes, hvg_flavor, target_sum
        self.hvg_max_cells = hvg_max_cells
        self.n_pcs, self.n_neighbors = n_pcs, n_neighbors
        self.mnn_neighbors, self.mnn_slots = mnn_neighbors, mnn_slots
        check_choice("data.pca_scaling", pca_scaling)
        self.pca_scaling = pca_scaling
        self.geometry_pcs, self.geometry_smoothing = geometry_pcs, geometry_smoothing
        self.pca_max_cells = pca_max_cells
        self.knn_index = knn_index
        self.knn_approximate_above, self.knn_nprobe = knn_approximate_above, knn_nprobe
        self.knn_min_recall = knn_min_recall
        # Normalise X in place instead of keeping a second copy: for an AnnData that
        # belongs to this run alone (train.py reads one per run), never a user's object.
        self.inplace = inplace
        self.knn_recall: float | None = None
        self.n_views, self.batch_size = n_views, batch_size
        self.neighbor_weighting = neighbor_weighting
        self.likelihood = likelihood
        self.min_group_size = min_group_size  # loss.min_group_size, for the warning below
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed = seed
        self._prepared = False
        if likelihood == "nb" and counts_layer is None and not looks_like_counts(self._x):
            raise ScProtoInputError(
                "The NB likelihood needs raw counts, but X holds non-integer values and "
                "`data.counts_layer` is not set. Set it to the layer with counts, or use "
                "`model.likelihood=mse`."
            )

    # ------------------------------------------------------------------ preparation
    @property
    def _x(self):
        """The expression matrix: X in memory, or the file's X (or layer) on disk."""
        return self.adata.X if self.source is None else self.source.X

    @property
    def is_reference(self) -> np.ndarray:
        return ~self.adata.obs[self.batch_key].astype(str).isin(self.query_studies).to_numpy()

    def _scan_source(
        self, adata: ad.AnnData, counts_layer: str | None, min_genes: int
    ) -> ad.AnnData:
        """Obs and var of the cells and genes with expression in the on-disk X."""
        with timed("scan (X on disk)", self.timings, log):
            self.scan = backed.scan(adata.X, where="X", expect_counts=False)
            if counts_layer is not None:
                backed.scan(
                    adata.layers[counts_layer],
                    where=f"layers[{counts_layer!r}]",
                    expect_counts=True,
                )
        self.source = adata
        self.source_cells = np.flatnonzero(self.scan.cell_nonzero > 0)
        return without_empty_cells_and_genes(
            ad.AnnData(obs=adata.obs, var=adata.var),
            min_genes=min_genes,
            nonzero=(self.scan.cell_nonzero, self.scan.gene_nonzero),
        )

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        adata, reference = self.adata, self.is_reference
        is_counts = bool(looks_like_counts(self._x))
        largest = self.scan.largest if self.scan else float(matrix_values(adata.X).max(initial=0))
        if not is_counts and largest > 30:
            log.warning(
                "X is treated as log-normalised but reaches %.0f; log1p(10^4-normalised) data "
                "rarely exceeds ~10. If X is normalised but not logged, pass raw counts instead.",
                largest,
            )
        # Library sizes of raw counts: the metacells' member counts are recovered with them.
        self.library_size = None
        if is_counts:
            self.library_size = (
                np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
                if self.source is None
                else self.scan.row_sum[self.source_cells]
            )
        needs_counts = self.likelihood == "nb" or self.hvg_flavor == "seurat_v3"
        has_counts = needs_counts and (self.counts_layer is not None or is_counts)
        hvg_rows = self._hvg_rows(reference)
        if self.source is None:
            raw_counts = self._raw_counts(is_counts) if needs_counts else None
            counts_in_x = raw_counts is not None and np.shares_memory(
                raw_counts.data, matrix_values(adata.X)
            )
            with timed("log-normalise", self.timings, log):
                full = log_normalized(
                    adata.X,
                    is_counts=is_counts,
                    target_sum=self.target_sum,
                    inplace=self.inplace and not counts_in_x,
                )
            hvg_data, hvg_counts = full, raw_counts
        else:
            with timed("read HVG cells", self.timings, log):
                hvg_data, hvg_counts = self._read_source_rows(hvg_rows, is_counts, has_counts)
            hvg_rows = None  # the rows read are those rows
        with timed("highly variable genes", self.timings, log):
            genes = highly_variable_genes(
                hvg_data,
                adata.var_names,
                n_top_genes=self.n_top_genes,
                flavor=self.hvg_flavor,
                counts=hvg_counts,
                rows=hvg_rows,
            )
        del hvg_data, hvg_counts
        self.spec = InputSpec(
            genes=tuple(genes),
            source=self.layer or "X",
            is_counts=is_counts,
            target_sum=self.target_sum,
            counts_layer=self.counts_layer if has_counts else None,
        )
        self.counts = None
        if self.source is None:
            self.x = select_genes(full, adata.var_names, genes)
            if self.likelihood == "nb":
                self.counts = select_genes(raw_counts, adata.var_names, genes)
        else:
            with timed("model input (streamed)", self.timings, log):
                self.x = self._streamed(self.source.X, genes, is_counts=is_counts)
                if self.likelihood == "nb":
                    self.counts = self._streamed(self._source_counts(), genes, is_counts=False)

        studies = adata.obs[self.batch_key].astype(str)
        self.studies = sorted(studies[reference].unique())
        self.study_codes = studies.map({s: i for i, s in enumerate(self.studies)}).fillna(-1)
        self.study_codes = self.study_codes.to_numpy().astype(np.int64)
        self.train_index = np.flatnonzero(reference)
        self.neighbors, self.distances = self._neighbor_graph(self.x, self.train_index)
        self.pca = self._study_pca()
        self._warn_small_study_groups()
        self._prepared = True
        log.info(
            "data ready: %d reference cells (%d studies), %d query cells, %d genes; setup %.1f s",
            len(self.train_index),
            len(self.studies),
            (~reference).sum(),
            len(genes),
            sum(self.timings.values()),
        )

    def _hvg_rows(self, reference: np.ndarray) -> np.ndarray:
        """The reference cells HVGs are chosen from: at most ``hvg_max_cells``, at random."""
        rows = np.flatnonzero(reference)
        if self.hvg_max_cells is None or rows.size <= self.hvg_max_cells:
            return rows
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(rows, self.hvg_max_cells, replace=False))

    def _source_counts(self):
        return self.source.layers[self.counts_layer] if self.counts_layer else self.source.X

    def _read_source_rows(self, rows, is_counts: bool, read_counts: bool):
        """Log data and raw counts of ``rows`` (of self.adata) from the file, for HVGs;
        nothing is read when every gene is kept."""
        if self.n_top_genes >= self.adata.n_vars:
            return None, None
        columns = self.source.var_names.get_indexer(self.adata.var_names)
        source_rows = self.source_cells[rows]
        log_data = backed.read_rows(self.source.X, source_rows)
        log_data = log_normalized(
            log_data, is_counts=is_counts, target_sum=self.target_sum, inplace=True
        )[:, columns]
        counts = None
        if read_counts:
            counts = backed.read_rows(self._source_counts(), source_rows)[:, columns]
        return log_data, counts

    def _streamed(self, matrix, genes, *, is_counts: bool) -> sp.csr_matrix:
        return backed.streamed_input(
            matrix,
            cells=self.source_cells,
            var_names=self.source.var_names,
            genes=genes,
            is_counts=is_counts,
            target_sum=self.target_sum,
            max_stored=self.scan.n_stored,
            directory=self.cache_dir / "model-input" if self.cache_dir else None,
        )

    def _warn_small_study_groups(self) -> None:
        """Studies whose expected anchors per minibatch fall below the SwAV group minimum."""
        min_group_size = self.min_group_size
        sizes = pd.Series(self.study_codes[self.train_index]).value_counts()
        batch = min(self.batch_size, len(self.train_index))
        expected = sizes * batch / len(self.train_index)
        small = [self.studies[code] for code, n in expected.items() if n < min_group_size]
        if small:
            log.warning(
                "studies %s expect fewer than %d anchors per minibatch of %d; their cells are "
                "pooled into one remainder group for the SwAV and propagation terms. A larger "
                "data.batch_size keeps them separate.",
                small,
                min_group_size,
                batch,
            )

    def _raw_counts(self, x_is_counts: bool) -> sp.csr_matrix | None:
        if self.counts_layer is not None:
            return as_csr32(source_matrix(self.adata, self.counts_layer))
        return as_csr32(self.adata.X) if x_is_counts else None

    def _neighbor_graph(self, x: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """kNN graph of ``x[rows]`` on its PCA (rows taken by index: no copy of the data)."""
        kind = knn.index_kind(self.knn_index, len(rows), self.knn_approximate_above)
        settings = {
            "n_pcs": self.n_pcs,
            "n_neighbors": self.n_neighbors,
            "index": kind,
            "nprobe": self.knn_nprobe if kind != "exact" else None,
            "min_recall": self.knn_min_recall if kind != "exact" else None,
            "seed": self.seed,
            "pca": "randomized-v2",
            "pca_max_cells": self.pca_max_cells,
        }
        if self.mnn_neighbors:  # keys only when on: the graphs cached before stay valid
            settings |= {"mnn_neighbors": self.mnn_neighbors, "mnn_slots": self.mnn_slots}
        if self.pca_scaling != "none":
            settings |= {"pca_scaling": self.pca_scaling}
        key = knn.data_fingerprint(x, rows, settings) if self.cache_dir else None
        cached = knn.load_cached(self.cache_dir, key)
        if cached is not None:
            self.timings["kNN graph (cached)"] = 0.0
            *found, self.knn_recall = cached
            return tuple(found)
        with timed(f"PCA + {self.n_neighbors}-NN ({kind}, faiss)", self.timings, log):
            neighbors, distances, self.knn_recall = graph.pca_neighbors(
                x,
                rows,
                n_pcs=self.n_pcs,
                n_neighbors=self.n_neighbors,
                kind=kind,
                seed=self.seed,
                nprobe=self.knn_nprobe,
                min_recall=self.knn_min_recall,
                pca_max_cells=self.pca_max_cells,
                groups=self.study_codes[rows],
                mnn_neighbors=self.mnn_neighbors,
                mnn_slots=self.mnn_slots,
                scaling=self.pca_scaling,
            )
        if kind != "exact":
            log.info(
                "kNN recall@%d %.3f against exact search on %d sampled cells",
                self.n_neighbors,
                self.knn_recall,
                min(knn.RECALL_QUERIES, len(rows)),
            )
        knn.save_cached(self.cache_dir, key, neighbors, distances, self.knn_recall)
        return neighbors, distances

    def _study_pca(self) -> np.ndarray | None:
        """Each training cell on its own study's top ``geometry_pcs`` components
        (:func:`scproto.data.graph.study_pca`), the geometry L_geometry keeps."""
        if not self.geometry_pcs:
            return None
        with timed(f"per-study PCA ({self.geometry_pcs} components)", self.timings, log):
            return graph.study_pca(
                self.x,
                self.train_index,
                self.study_codes[self.train_index],
                n_components=self.geometry_pcs,
                smoothing=self.geometry_smoothing,
                seed=self.seed,
                pca_max_cells=self.pca_max_cells,
                approximate_above=self.knn_approximate_above,
            )

    # ------------------------------------------------------------------ what the model needs
    @property
    def registry(self) -> Registry:
        """Everything inference needs to turn new AnnData into model input."""
        return Registry(
            input_spec=self.spec,
            batch_key=self.batch_key,
            label_key=self.label_key,
            studies=list(self.studies),
            reference_studies=list(self.studies),  # studies grows with query mapping
            likelihood=self.likelihood,
            view_settings={  # query mapping builds the query cells' views the same way
                "n_pcs": self.n_pcs,
                "pca_scaling": self.pca_scaling,
                "n_neighbors": self.n_neighbors,
                "mnn_neighbors": self.mnn_neighbors,
                "mnn_slots": self.mnn_slots,
                "neighbor_weighting": self.neighbor_weighting,
                "geometry_pcs": self.geometry_pcs,
                "geometry_smoothing": self.geometry_smoothing,
                "pca_max_cells": self.pca_max_cells,
                "knn_approximate_above": self.knn_approximate_above,
            },
        )

    def train_dataloader(self) -> DataLoader:
        rows = ViewRows(self.x, self.study_codes, self.counts, cells=self.train_index, pca=self.pca)
        sampler = ViewBatchSampler(
            self.neighbors,
            batch_size=min(self.batch_size, len(self.train_index)),
            n_views=self.n_views,
            seed=self.seed,
            probabilities=neighbor_probabilities(self.distances, self.neighbor_weighting),
            # data.batch_size is the global minibatch; each DDP rank takes its share
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
        )
        return DataLoader(
            rows,
            batch_sampler=sampler,
            collate_fn=identity_collate,
            # Its own generator: the loader then draws nothing from the global stream, whose
            # state at an epoch's end is what a resumed run starts the next epoch from.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
