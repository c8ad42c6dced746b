"""The user-facing model object: set up AnnData, train, embed, denoise, decode metacells,
map query studies, save and load; the same model `train.py` builds."""

import difflib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from scproto.data.io import check_expression, check_gene_names
from scproto.data.preprocess import (
    as_csr32,
    log_normalized,
    looks_like_counts,
    select_genes,
    source_matrix,
)
from scproto.errors import ScProtoInputError
from scproto.metacells import decode_prototypes, nearest_rows, prototype_names
from scproto.model.module import SETTING_GROUPS as MODULE_SETTING_GROUPS
from scproto.model.module import ScProtoModule
from scproto.query import expand_studies, mapping_targets, train_new_rows
from scproto.registry import Registry
from scproto.run.checkpoint import load_checkpoint, stored_settings
from scproto.run.directory import CHECKPOINT, atomic_path
from scproto.run.hydra import compose_config
from scproto.run.quiet import quiet_third_party
from scproto.run.settings import POSITIVE, check_argument, check_choice, count

log = logging.getLogger(__name__)

MODEL_FILE = "model.ckpt"  # what save() writes into a directory
SETUP_KEY = "_scproto"  # adata.uns entry written by setup_anndata
# Config groups whose settings are keywords of ScProto(adata, ...); data keys that
# setup_anndata sets, or that only apply to a file, are not.
SETTING_GROUPS = (*MODULE_SETTING_GROUPS, "data")
NOT_KEYWORDS = {
    "source", "path", "synthetic", "backed",
    "batch_key", "label_key", "layer", "counts_layer",
}  # fmt: skip


class ScProto:
    """An scProto model, trained here or loaded.

    >>> ScProto.setup_anndata(adata, batch_key="study", labels_key="cell_type")
    >>> model = ScProto(adata, n_prototypes=300)
    >>> model.train(max_epochs=60)
    >>> adata.obsm["X_scproto"] = model.get_latent_representation()
    >>> model = ScProto.load("outputs/run/", adata=adata)  # a run of train.py
    """

    def __init__(self, adata: "ad.AnnData | ScProtoModule", **settings) -> None:
        """A new, untrained model of ``adata`` (registered by :meth:`setup_anndata`), or
        the model of a trained ``ScProtoModule``.

        ``settings``: any setting of the config groups model, loss, sinkhorn and data by
        its name (``n_prototypes=300``, ``lambda_prop=1.0``, ``epsilon=0.02``,
        ``n_top_genes=2000``), plus ``optimizer`` (``"adam"`` or ``"lars"``) and ``seed``;
        the defaults are those of ``python train.py``.
        """
        self.adata: ad.AnnData | None = None
        self.mapping_losses: list[float] = []  # loss per epoch of the last map_query
        self._metacells: ad.AnnData | None = None
        if isinstance(adata, ScProtoModule):
            if settings:
                raise TypeError("settings apply to a new model, not to a trained module")
            self._attach(adata)
            return
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"ScProto(adata): expected an AnnData, got {type(adata).__name__}")
        self.module = None
        self.registry, self.spec = None, None
        self.adata = adata
        self.config = training_config(setup_of(adata), settings)

    def _attach(self, module: ScProtoModule) -> None:
        self.module = module.eval()
        self.module.cvae.settle_study_embedding()  # lookups must not change the weights
        self.registry: Registry = module.registry
        self.spec = self.registry.input_spec

    @property
    def is_trained(self) -> bool:
        return self.module is not None

    def _trained(self) -> None:
        if not self.is_trained:
            raise ScProtoInputError("This model is not trained yet: call model.train() first.")

    def _data(self, adata: ad.AnnData | None) -> ad.AnnData:
        if adata is not None:
            return adata
        if self.adata is None:
            raise ScProtoInputError(
                "No AnnData given, and none is attached to this model: pass adata=..., or "
                "load the model with ScProto.load(path, adata=adata)."
            )
        return self.adata

    def __repr__(self) -> str:
        if self.module is None:
            cfg = self.config
            return (
                f"ScProto model (not trained) of {self.adata.n_obs} cells × "
                f"{self.adata.n_vars} genes: {cfg.model.n_prototypes} prototypes, latent "
                f"dimension {cfg.model.latent_dim}, batch key {cfg.data.batch_key!r}. "
                "Train it with model.train()."
            )
        studies, reference = self.registry.studies, self.registry.reference_studies
        hparams = self.module.hparams
        source = "X" if self.spec.source == "X" else f"layers[{self.spec.source!r}]"
        kind = "raw counts" if self.spec.is_counts else "log-normalised data"
        lines = [
            f"ScProto model: {hparams.n_prototypes} prototypes, latent dimension "
            f"{hparams.latent_dim}, {hparams.likelihood.upper()} likelihood",
            f"  input: {len(self.spec.genes)} genes from {source} ({kind})",
            f"  studies ({self.registry.batch_key!r}): {len(reference)} reference "
            f"({', '.join(reference[:4])}{', …' if len(reference) > 4 else ''})"
            + (
                f", {len(studies) - len(reference)} mapped" if len(studies) > len(reference) else ""
            ),
            f"  labels: {self.registry.label_key or 'none'}",
        ]
        if self.adata is not None:
            lines.append(f"  attached AnnData: {self.adata.n_obs} cells")
        return "\n".join(lines)

    # ----------------------------------------------------------------- setup and training
    @staticmethod
    def setup_anndata(
        adata: ad.AnnData,
        batch_key: str,
        labels_key: str | None = None,
        layer: str | None = None,
        counts_layer: str | None = None,
    ) -> None:
        """Register which columns and matrices of ``adata`` the model reads.

        ``batch_key``: the study (batch) column of ``obs``; ``labels_key``: cell types
        (optional, for the prototype labels and label transfer; never used in training);
        ``layer``: the expression to train on, raw counts (normalised to 10⁴ and log1p'd)
        or log-normalised data; None means X. ``counts_layer``: raw counts for the NB
        likelihood or seurat_v3 HVGs (defaults to ``layer`` when that holds counts).
        Stored in ``adata.uns['_scproto']``.
        """
        if batch_key not in adata.obs:
            raise ScProtoInputError(
                f"batch_key {batch_key!r} is not an obs column; columns: "
                f"{', '.join(map(repr, adata.obs.columns[:20])) or 'none'}."
            )
        if labels_key is not None and labels_key not in adata.obs:
            raise ScProtoInputError(f"labels_key {labels_key!r} is not an obs column.")
        for name, value in (("layer", layer), ("counts_layer", counts_layer)):
            if value is not None and value not in adata.layers:
                raise ScProtoInputError(
                    f"{name}={value!r} is not a layer of this AnnData; layers: "
                    f"{list(adata.layers.keys()) or 'none'}."
                )
        if counts_layer is None and layer is not None and looks_like_counts(adata.layers[layer]):
            counts_layer = layer
        adata.uns[SETUP_KEY] = {
            "batch_key": batch_key,
            "label_key": labels_key,
            "layer": layer,
            "counts_layer": counts_layer,
        }

    def train(
        self,
        max_epochs: int | None = None,
        *,
        accelerator: str = "auto",
        devices: int | str = "auto",
        batch_size: int | None = None,
        save_dir: str | Path | None = None,
        progress_bar: bool = True,
        overrides: Sequence[str] = (),
    ) -> "ScProto":
        """Fit the model on every cell of its AnnData, as ``python train.py`` does.

        ``max_epochs`` and ``batch_size`` (anchor cells per minibatch) default to the
        training config's (60, 512 or 1024). ``save_dir``: where the per-epoch checkpoint
        and the CSV loss log go (a temporary folder, removed afterwards, if None).
        ``overrides``: any other ``train.py`` override, e.g. ``["optimizer.lr=1e-3"]``.
        Returns the model, trained.
        """
        from scproto import train as run  # the training path of train.py

        quiet_third_party()
        cfg = self.config.copy()
        updates = {
            "trainer.max_epochs": max_epochs,
            "trainer.accelerator": accelerator,
            "trainer.devices": devices,
            "trainer.enable_progress_bar": progress_bar,
            "data.batch_size": batch_size,
        }
        for key, value in updates.items():
            if value is not None:
                OmegaConf.update(cfg, key, value)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        with tempfile.TemporaryDirectory(prefix="scproto-") as temporary:
            directory = Path(save_dir) if save_dir is not None else Path(temporary)
            OmegaConf.update(cfg, "paths.output_dir", str(directory))
            if save_dir is None:
                cfg.logger = None
            run.validate_config(cfg)
            pl.seed_everything(cfg.seed, workers=True)
            datamodule = run.build_datamodule(cfg, self.adata, inplace=False)
            datamodule.setup("fit")
            module = run.build_module(cfg, datamodule)
            trainer = run.build_trainer(cfg, directory)
            trainer.fit(module, datamodule=datamodule, weights_only=True)
        self._attach(module)
        self._metacells = run.describe_prototypes(self, datamodule, cfg)[2]
        self.config = cfg
        return self

    @classmethod
    def load(
        cls, path: str | Path, adata: ad.AnnData | None = None, map_location: str = "cpu"
    ) -> "ScProto":
        """A saved model: a checkpoint file, a directory :meth:`save` wrote, or a run
        directory (its ``checkpoints/last.ckpt``), with ``adata`` attached (the default
        data of its methods). Read with ``weights_only``: a file carrying pickled
        objects is refused."""
        path = Path(path)
        if path.is_dir():
            inside = [path / MODEL_FILE, path / CHECKPOINT]
            path = next((p for p in inside if p.is_file()), inside[0])
        checkpoint = load_checkpoint(path)
        if not checkpoint.get("scproto_registry") or "hyper_parameters" not in checkpoint:
            raise ScProtoInputError(
                f"{path} is a checkpoint but not an scProto model's (it has no registry)."
            )
        try:
            module = ScProtoModule(**stored_settings(checkpoint))
            if any(".study_shift." in key for key in checkpoint["state_dict"]):
                module.cvae.add_study_shifts()  # a model that mapped studies with them
            module.load_state_dict(checkpoint["state_dict"])
        except (TypeError, RuntimeError, KeyError) as error:
            raise ScProtoInputError(
                f"{path} does not match this scproto version's model ({error}); load it with "
                f"the scproto version that wrote it ({checkpoint['scproto_registry'].get('scproto_version', '?')})."
            ) from error
        module.on_load_checkpoint(checkpoint)
        model = cls(module.to(map_location))
        model.adata = adata
        return model

    # ----------------------------------------------------------------- inputs
    @property
    def studies(self) -> list[str]:
        return list(self.registry.studies)

    def study_codes(self, adata: ad.AnnData) -> np.ndarray:
        """Index of each cell's study in the model; −1 for studies it was not trained on."""
        key = self.registry.batch_key
        if key not in adata.obs:
            raise ScProtoInputError(
                f"obs[{key!r}] (the study key the model was trained with) is missing from the data."
            )
        codes = pd.Categorical(adata.obs[key].astype(str), categories=self.studies).codes
        return codes.astype(np.int64)

    def model_input(self, adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
        """The log-normalised model genes, prepared exactly as for training, from the
        matrix the model was trained on (X or its layer) or from ``layer``."""
        self._trained()
        check_gene_names(adata.var_names)
        source = layer or self.spec.source
        where = "X" if source == "X" else f"layers[{source!r}]"
        if source != "X" and source not in adata.layers:
            raise ScProtoInputError(
                f"The model reads {where}, which this AnnData lacks (layers: "
                f"{list(adata.layers.keys()) or 'none'}). Pass layer=... naming the matrix "
                "of the same kind (raw counts or log-normalised), or 'X'."
            )
        matrix = source_matrix(adata, source)
        if matrix is None:
            raise ScProtoInputError(
                "This AnnData has no expression matrix (X is None), so there is nothing to "
                "embed. A run's embedding.h5ad holds the embedding itself (obsm['X_scproto']); "
                "give the expression data the model should embed."
            )
        check_expression(matrix, where=where, expect_counts=False)
        kind = looks_like_counts(matrix)
        if kind is None:
            warnings.warn(
                f"every sampled cell of {where} is all-zero: these cells carry no expression, "
                "and their embedding says only which study they come from",
                stacklevel=2,
            )
        elif kind != self.spec.is_counts:
            trained, given = (
                ("raw counts", "log") if self.spec.is_counts else ("log-normalised", "count")
            )
            raise ScProtoInputError(
                f"The model was trained on {trained}, but {where} looks like {given} data. "
                "Give the same kind of matrix the model was trained on (layer=...)."
            )
        full = log_normalized(
            matrix, is_counts=self.spec.is_counts, target_sum=self.spec.target_sum
        )
        return select_genes(full, adata.var_names, self.spec.genes)

    def counts_input(self, adata: ad.AnnData) -> sp.csr_matrix | None:
        """Raw counts of the model genes (for the NB likelihood), or None for MSE models."""
        if self.module.cvae.likelihood != "nb":
            return None
        source = self.spec.counts_layer or self.spec.source
        return select_genes(
            as_csr32(source_matrix(adata, source)), adata.var_names, self.spec.genes
        )

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a checkpoint that :meth:`load` reads (the format Lightning writes, plain
        data only); a directory gets ``model.ckpt`` inside. Returns the file written.

        >>> model.save("my_model/")                # my_model/model.ckpt
        >>> ScProto.load("my_model/")
        """
        as_directory = str(path).endswith(("/", os.sep))  # Path() drops the trailing slash
        path = Path(path)
        if path.is_dir() or as_directory:
            path = path / MODEL_FILE
        if path.exists() and not overwrite:
            raise ScProtoInputError(f"{path} exists; pass overwrite=True to replace it.")
        checkpoint = {
            "state_dict": self.module.state_dict(),
            "hyper_parameters": dict(self.module.hparams),
            "pytorch-lightning_version": pl.__version__,
            "scproto_registry": self.registry.to_dict(),
        }
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)
        return path

    # ----------------------------------------------------------------- query mapping
    def map_query(
        self,
        adata: ad.AnnData,
        epochs: int = 100,
        lr: float = 1e-2,
        batch_size: int = 512,
        seed: int = 0,
        *,
        objective: str = "scproto",
        study_shift: bool = True,
        targets: str = "all",
        mnn_neighbors: int = 10,
        x: sp.csr_matrix | None = None,
        counts: sp.csr_matrix | None = None,
    ) -> "ScProto":
        """A new model that also knows the studies of ``adata`` the model has not seen.

        ``x`` (and, for the NB likelihood, ``counts``): the model input of every row of
        ``adata`` (:meth:`model_input`, :meth:`counts_input`), when the caller has it
        already (training does); otherwise the new studies' cells are prepared.

        scArches surgery: each new study gets its own embedding row (and, ``study_shift``,
        a free shift of each conditioned layer); only those rows (and their NB dispersion)
        train, for ``epochs`` epochs on the new studies' cells; every other parameter stays
        bit-identical. ``objective="scproto"`` trains them with the training loss on views
        of the query cells built as training built the reference's (SwAV within each new
        study over the frozen prototypes, propagation, L_cvae, L_geometry), so the query
        lands where the reference put the same cells; ``"cvae"`` is scArches' L_cvae alone.
        ``targets``: the prototypes SwAV's codes may use, ``"all"`` or ``"populated"``
        (only those some reference cell is nearest to: Sinkhorn then shares each new study
        among them alone, so no query cell is sent to a prototype that stands for no
        population). ``mnn_neighbors`` = k > 0 (``objective="scproto"``), when ``adata``
        also holds cells of the model's own studies: those reference cells join the mapping
        as anchors and views, and a query cell's views also take its mutual nearest
        neighbours among them (k nearest both ways on a PCA of all the cells, as
        ``data.mnn_neighbors`` in training), so SwAV asks the query cell to agree with the
        code the frozen model gives its reference partner within the partner's own study.
        An epoch keeps the query's own number of steps. Without reference cells in
        ``adata`` (or with 0) the query maps on its own views. Genes are matched by name.

        >>> mapped = model.map_query(query_adata, epochs=100)
        >>> query_adata.obsm["X_scproto"] = mapped.get_latent(query_adata)
        """
        check_argument("epochs", epochs, count(0))
        check_argument("lr", lr, POSITIVE)
        check_argument("batch_size", batch_size, count(1))
        check_choice("query.objective", objective)  # before the query is prepared
        check_argument("mnn_neighbors", mnn_neighbors, count(0))
        target_prototypes = mapping_targets(self.module, targets)
        key = self.registry.batch_key
        self.study_codes(adata)  # checks the key
        studies = pd.unique(adata.obs[key].astype(str))
        new_studies = [s for s in studies if s not in self.studies]
        if not new_studies:
            warnings.warn(
                "every study of the query is known to the model: nothing to map", stacklevel=2
            )
            return self
        mapped = ScProto(expand_studies(self.module, new_studies, study_shift))
        codes = mapped.study_codes(adata)
        query = np.flatnonzero(codes >= len(self.studies))
        paired = mnn_neighbors > 0 and objective == "scproto"
        reference = np.flatnonzero(codes < len(self.studies)) if paired else None
        if paired and not len(reference):
            log.info(
                "query mapping on the new studies' own views: adata holds no cells of the "
                "model's studies to pair them with (pass the reference cells too, with their "
                "studies, for mnn_neighbors=%d)",
                mnn_neighbors,
            )
        if x is None:  # prepare the query (and, paired, the reference) cells alone
            used = query if reference is None else np.concatenate([query, reference])
            cells = adata[used]
            x, codes, counts = mapped.model_input(cells), codes[used], mapped.counts_input(cells)
            query, reference = (
                np.arange(len(query)),
                None if reference is None else np.arange(len(query), len(used)),
            )
        elif counts is None:
            counts = mapped.counts_input(adata)  # None for MSE models
        mapped.mapping_losses = train_new_rows(
            mapped.module,
            x,
            codes,
            counts,
            cells=query,
            objective=objective,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            targets=target_prototypes,
            reference=reference,
            mnn_neighbors=mnn_neighbors,
        )
        return mapped

    def get_study_embeddings(self) -> pd.DataFrame:
        """The study embeddings (studies × embedding_dim), as the model uses them."""
        cvae = self.module.cvae
        with torch.no_grad():
            rows = cvae.study_embedding(torch.arange(len(self.studies), device=self.module.device))
        return pd.DataFrame(rows.cpu().numpy(), index=self.studies)

    # ----------------------------------------------------------------- outputs
    @torch.no_grad()
    def latent_of(self, x: sp.csr_matrix, study: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """μ for rows of a prepared model-input matrix (see :meth:`model_input`)."""
        check_argument("batch_size", batch_size, count(1))
        device = self.module.device
        parts = []
        for start in range(0, x.shape[0], batch_size):
            rows = torch.from_numpy(x[start : start + batch_size].toarray()).to(device)
            codes = torch.from_numpy(study[start : start + batch_size]).to(device)
            parts.append(self.module.cvae.encode(rows, codes)[0].cpu())
        return torch.cat(parts).numpy()

    def get_latent_representation(
        self, adata: ad.AnnData | None = None, layer: str | None = None, batch_size: int = 4096
    ) -> np.ndarray:
        """Posterior mean μ of every cell (n_cells × latent_dim) of ``adata`` (the
        model's own AnnData by default). Deterministic.

        >>> adata.obsm["X_scproto"] = model.get_latent_representation(adata)
        """
        adata = self._data(adata)
        x = self.model_input(adata, layer)
        return self.latent_of(x, self.study_codes(adata), batch_size)

    def get_latent(self, adata: ad.AnnData, batch_size: int = 4096) -> np.ndarray:
        """:meth:`get_latent_representation` (the name of earlier versions)."""
        return self.get_latent_representation(adata, batch_size=batch_size)

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        transform_batch: str | None = None,
        *,
        layer: str | None = None,
        batch_size: int = 4096,
        return_numpy: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression of every cell: its μ decoded (cells × model genes), as
        normalised expression (counts per ``target_sum``, 10⁴), not logged.

        ``transform_batch``: decode every cell as if from this study (a name the model
        knows), removing the study effect; None decodes each cell with its own study
        (cells of unknown studies with the mean reference study).
        """
        adata = self._data(adata)
        latent = self.get_latent_representation(adata, layer=layer, batch_size=batch_size)
        codes = self.study_codes(adata)
        if transform_batch is not None:
            if str(transform_batch) not in self.studies:
                raise ScProtoInputError(
                    f"transform_batch={transform_batch!r} is not a study of this model; "
                    f"studies: {self.studies[:20]}."
                )
            codes = np.full(len(codes), self.studies.index(str(transform_batch)))
        cvae, device = self.module.cvae, self.module.device
        parts = []
        for start in range(0, len(latent), batch_size):
            z = torch.from_numpy(latent[start : start + batch_size]).to(device)
            study = torch.from_numpy(codes[start : start + batch_size]).to(device)
            decoded = cvae.decode(z, cvae.condition(study), study).cpu().numpy()
            parts.append(
                decoded * self.spec.target_sum if cvae.likelihood == "nb" else np.expm1(decoded)
            )
        expression = np.concatenate(parts).astype(np.float32)
        if return_numpy:
            return expression
        return pd.DataFrame(expression, index=adata.obs_names, columns=list(self.spec.genes))

    def get_metacells(self) -> ad.AnnData:
        """The metacells of a model trained here: the prototype table ``train.py``
        writes as ``metacells.h5ad`` (decoded profiles, sizes, labels, purity, study mix)."""
        self._trained()
        if self._metacells is None:
            raise ScProtoInputError(
                "The metacell table is made when training; for a loaded model read the run's "
                "metacells.h5ad, or use decode_metacells() for the decoded profiles alone."
            )
        return self._metacells

    def get_prototypes(self) -> np.ndarray:
        """The K unit-norm prototypes (K × latent_dim)."""
        return F.normalize(self.module.prototypes.detach(), dim=1).cpu().numpy()

    @property
    def assignment(self) -> str:
        """How a cell takes its prototype (``model.assignment``): ``point``, the prototype
        whose decoding point (its metacell's place in μ) is nearest, or ``cosine``, the one
        of highest cosine. A model without stored points assigns by cosine."""
        if self.module.hparams.assignment == "point" and self.registry.prototype_points:
            return "point"
        return "cosine"

    @torch.no_grad()
    def prototype_similarity(
        self, latent: np.ndarray, assignment: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each latent row's prototype (by ``assignment``, the model's by default) and the
        cosine similarity to it.

        Training's SwAV scores cells by cosine, whose region for a prototype is a cone from
        the origin holding cells of every norm; L_geometry keeps distances in μ, so cells
        of one cone can lie far apart. The nearest decoding point splits μ into compact
        regions around the metacells instead (benchmarks/table1/README.md)."""
        if (assignment or self.assignment) == "cosine":
            scores = self.module.scores(torch.from_numpy(latent).to(self.module.device))
            similarity, prototype = scores.max(dim=1)
            return prototype.cpu().numpy(), similarity.cpu().numpy()
        prototype = nearest_rows(latent, np.asarray(self.registry.prototype_points), 1)[:, 0]
        # the cosine to the one prototype each row takes: no rows × K score matrix
        unit = latent / np.linalg.norm(latent, axis=1, keepdims=True).clip(1e-12)
        return prototype, (unit * self.get_prototypes()[prototype]).sum(axis=1)

    def assign_prototypes(
        self, adata: ad.AnnData | None = None, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(index of each cell's prototype, its cosine similarity): see
        :meth:`prototype_similarity`."""
        return self.prototype_similarity(self.get_latent_representation(adata, layer=layer))

    # ----------------------------------------------------------------- metacells and labels
    def decode_metacells(self) -> ad.AnnData:
        """Every prototype decoded into a batch-free profile (K × genes).

        ``X`` is in the model's input space (log-normalised), ``layers['normalized']`` the
        normalised expression. Each prototype is decoded at the mean μ of its training cells
        (stored at training) with the mean reference study embedding; NB models at a library
        size of ``target_sum``. A model saved before decoding points were stored decodes
        the prototype at its cells' mean ‖μ‖ instead. The run's ``metacells.h5ad`` adds
        per-prototype statistics.
        """
        registry = self.registry
        if registry.prototype_points is not None:
            points = np.asarray(registry.prototype_points)
        else:
            prototypes = self.get_prototypes()
            norms = registry.prototype_norms
            points = prototypes * np.asarray(norms if norms is not None else 1.0).reshape(-1, 1)
        n_prototypes = len(points)
        n_reference = len(registry.reference_studies)
        expression, normalised = decode_prototypes(
            self.module, points, n_reference, self.spec.target_sum
        )
        result = ad.AnnData(
            X=expression.astype(np.float32),
            obs=pd.DataFrame(index=prototype_names(n_prototypes)),
            var=pd.DataFrame(index=list(self.spec.genes)),
        )
        result.layers["normalized"] = normalised.astype(np.float32)
        return result

    def label_predictions(
        self, prototype: np.ndarray, similarity: np.ndarray, threshold: float | None = None
    ) -> pd.DataFrame:
        """Labels of the nearest prototypes, with uncertainty 1 − max(similarity, 0) × the
        prototype's label confidence; above ``threshold`` the label is 'unknown'."""
        if not self.registry.has_labels:
            raise ScProtoInputError(
                "This model has no prototype labels: it was trained without `data.label_key`."
            )
        labels = np.asarray(self.registry.prototype_labels, dtype=object)
        confidence = np.asarray(self.registry.prototype_label_confidence, dtype=float)
        uncertainty = 1.0 - np.clip(similarity, 0.0, 1.0) * np.nan_to_num(confidence[prototype])
        if threshold is None:
            threshold = self.registry.label_uncertainty_threshold
        predicted = np.where(uncertainty > threshold, "unknown", labels[prototype])
        known = self.registry.label_categories or sorted(
            {str(label) for label in labels if isinstance(label, str)}
        )
        categories = [*known, *(["unknown"] if "unknown" not in known else [])]
        return pd.DataFrame(
            {
                "predicted_label": pd.Categorical(predicted, categories=categories),
                "label_uncertainty": uncertainty,
            }
        )

    def predict_labels(
        self, adata: ad.AnnData | None = None, threshold: float | None = None
    ) -> pd.DataFrame:
        """Cell-type label of every cell from its nearest prototype (label transfer):
        categorical, with the training labels' categories and 'unknown'.

        >>> adata.obs[["predicted_label", "label_uncertainty"]] = model.predict_labels(adata)
        """
        adata = self._data(adata)
        frame = self.label_predictions(*self.assign_prototypes(adata), threshold=threshold)
        frame.index = adata.obs_names
        return frame


def setup_of(adata: ad.AnnData) -> dict:
    """What :meth:`ScProto.setup_anndata` registered on ``adata``."""
    setup = adata.uns.get(SETUP_KEY)
    if not setup:
        raise ScProtoInputError(
            "This AnnData is not set up for scProto: call "
            "scproto.ScProto.setup_anndata(adata, batch_key=...) first."
        )
    return dict(setup)


def training_config(setup: dict, settings: dict) -> DictConfig:
    """The ``train.py`` config of a model of set-up AnnData with keyword ``settings``:
    the same defaults, so both doors give the same model."""
    settings = dict(settings)
    groups = [f"optimizer={settings.pop('optimizer')}"] if "optimizer" in settings else []
    cfg = compose_config("train", ["data=h5ad", "eval=none", *groups])
    with open_dict(cfg):
        cfg.data.update({k: setup.get(k) for k in ("batch_key", "label_key", "layer")})
        cfg.data.counts_layer = setup.get("counts_layer")
        cfg.data.query_studies = []  # every cell trains; map new studies with map_query
        cfg.paths.cache_dir = None  # no kNN cache written next to the user's work
        cfg.paths.output_dir = None
        if "seed" in settings:
            cfg.seed = settings.pop("seed")
        for name, value in settings.items():
            cfg[setting_group(cfg, name)][name] = value
    return cfg


def setting_group(cfg: DictConfig, name: str) -> str:
    """The config group of a keyword setting, or an error that names the right one."""
    if name in NOT_KEYWORDS:
        raise ScProtoInputError(
            f"{name!r} is not a model setting: batch, label and layer keys are given to "
            "ScProto.setup_anndata, and a file's settings to train.py."
        )
    groups = [g for g in SETTING_GROUPS if name in cfg[g]]
    if groups:
        return groups[0]
    known = sorted({k for g in SETTING_GROUPS for k in cfg[g] if k not in NOT_KEYWORDS})
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else f" Settings: {', '.join(known)}."
    raise ScProtoInputError(f"{name!r} is not a setting of ScProto.{hint}")
