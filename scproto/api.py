"""The user-facing model object: load a trained scProto model and apply it to AnnData."""

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scproto.data.io import check_expression, check_gene_names
from scproto.data.preprocess import (
    InputSpec,
    as_csr32,
    log_normalized,
    looks_like_counts,
    select_genes,
    source_matrix,
)
from scproto.errors import ScProtoInputError
from scproto.metacells import decode_prototypes
from scproto.model.module import ScProtoModule
from scproto.query import expand_studies, train_new_rows
from scproto.run.checkpoint import load_checkpoint
from scproto.run.directory import CHECKPOINT, atomic_path
from scproto.run.settings import POSITIVE, check_argument, count

MODEL_FILE = "model.ckpt"  # what save() writes into a directory


class ScProto:
    """A trained scProto model.

    >>> model = ScProto.load("outputs/run/checkpoints/last.ckpt")
    >>> adata.obsm["X_scproto"] = model.get_latent(adata)
    >>> prototype, similarity = model.assign_prototypes(adata)
    """

    def __init__(self, module: ScProtoModule) -> None:
        self.module = module.eval()
        self.module.cvae.settle_study_embedding()  # lookups must not change the weights
        self.registry = module.registry
        self.spec = InputSpec.from_dict(self.registry["input_spec"])
        self.mapping_losses: list[float] = []  # CVAE loss per epoch of the last map_query

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> "ScProto":
        """A saved model: a checkpoint file, a directory :meth:`save` wrote, or a run
        directory (its ``checkpoints/last.ckpt``). Read with ``weights_only``: a file
        carrying pickled objects is refused."""
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
            module = ScProtoModule(**checkpoint["hyper_parameters"])
            module.load_state_dict(checkpoint["state_dict"])
        except (TypeError, RuntimeError, KeyError) as error:
            raise ScProtoInputError(
                f"{path} does not match this scproto version's model ({error}); load it with "
                f"the scproto version that wrote it ({checkpoint['scproto_registry'].get('scproto_version', '?')})."
            ) from error
        module.on_load_checkpoint(checkpoint)
        return cls(module.to(map_location))

    # ----------------------------------------------------------------- inputs
    @property
    def studies(self) -> list[str]:
        return list(self.registry["studies"])

    def study_codes(self, adata: ad.AnnData) -> np.ndarray:
        """Index of each cell's study in the model; −1 for studies it was not trained on."""
        key = self.registry["batch_key"]
        if key not in adata.obs:
            raise ScProtoInputError(
                f"obs[{key!r}] (the study key the model was trained with) is missing from the data."
            )
        codes = pd.Categorical(adata.obs[key].astype(str), categories=self.studies).codes
        return codes.astype(np.int64)

    def model_input(self, adata: ad.AnnData) -> sp.csr_matrix:
        """The log-normalised model genes, prepared exactly as for training."""
        check_gene_names(adata.var_names)
        matrix = source_matrix(adata, self.spec.source)
        if matrix is None:
            raise ScProtoInputError(
                "This AnnData has no expression matrix (X is None), so there is nothing to "
                "embed. A run's embedding.h5ad holds the embedding itself (obsm['X_scproto']); "
                "give the expression data the model should embed."
            )
        check_expression(matrix, where="X", expect_counts=False)
        kind = looks_like_counts(matrix)
        if kind is None:
            warnings.warn(
                "every sampled cell of X is all-zero: these cells carry no expression, and "
                "their embedding says only which study they come from",
                stacklevel=2,
            )
        elif kind != self.spec.is_counts:
            trained, given = (
                ("raw counts", "log") if self.spec.is_counts else ("log-normalised", "count")
            )
            raise ScProtoInputError(
                f"The model was trained on {trained} in X, but this X looks like {given} data. "
                "Give the same kind of matrix the model was trained on."
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
            "scproto_registry": self.registry,
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
        batch_size: int = 1024,
        seed: int = 0,
        *,
        x: sp.csr_matrix | None = None,
        counts: sp.csr_matrix | None = None,
    ) -> "ScProto":
        """A new model that also knows the studies of ``adata`` the model has not seen.

        ``x`` (and, for the NB likelihood, ``counts``): the model input of every row of
        ``adata`` (:meth:`model_input`, :meth:`counts_input`), when the caller has it
        already (training does); otherwise the new studies' cells are prepared.

        scArches surgery: each new study gets its own embedding row; only those rows (and
        their NB dispersion) train, for ``epochs`` epochs on the new studies' cells; every
        other parameter stays bit-identical. Genes are matched by name.

        >>> mapped = model.map_query(query_adata, epochs=100)
        >>> query_adata.obsm["X_scproto"] = mapped.get_latent(query_adata)
        """
        check_argument("epochs", epochs, count(0))
        check_argument("lr", lr, POSITIVE)
        check_argument("batch_size", batch_size, count(1))
        key = self.registry["batch_key"]
        self.study_codes(adata)  # checks the key
        studies = pd.unique(adata.obs[key].astype(str))
        new_studies = [s for s in studies if s not in self.studies]
        if not new_studies:
            warnings.warn(
                "every study of the query is known to the model: nothing to map", stacklevel=2
            )
            return self
        mapped = ScProto(expand_studies(self.module, new_studies))
        codes = mapped.study_codes(adata)
        query = np.flatnonzero(codes >= len(self.studies))
        cells = adata[query]  # a view: a matrix is read only if x or counts is not given
        mapped.mapping_losses = train_new_rows(
            mapped.module,
            mapped.model_input(cells) if x is None else x[query],
            codes[query],
            mapped.counts_input(cells) if counts is None else counts[query],
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
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

    def get_latent(self, adata: ad.AnnData, batch_size: int = 4096) -> np.ndarray:
        """Posterior mean μ of every cell (n_cells × latent_dim). Deterministic."""
        return self.latent_of(self.model_input(adata), self.study_codes(adata), batch_size)

    def get_prototypes(self) -> np.ndarray:
        """The K unit-norm prototypes (K × latent_dim)."""
        return F.normalize(self.module.prototypes.detach(), dim=1).cpu().numpy()

    @torch.no_grad()
    def prototype_similarity(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest prototype by cosine similarity, and that similarity, for each latent row."""
        scores = self.module.scores(torch.from_numpy(latent).to(self.module.device))
        similarity, prototype = scores.max(dim=1)
        return prototype.cpu().numpy(), similarity.cpu().numpy()

    def assign_prototypes(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """(index of the nearest prototype, its cosine similarity) for every cell."""
        return self.prototype_similarity(self.get_latent(adata))

    # ----------------------------------------------------------------- metacells and labels
    def decode_metacells(self) -> ad.AnnData:
        """Every prototype decoded into a batch-free profile (K × genes).

        ``X`` is in the model's input space (log-normalised), ``layers['normalized']`` the
        normalised expression. Each prototype is decoded at the mean ‖μ‖ of its training
        cells (stored at training) with the mean reference study embedding; NB models at a
        library size of ``target_sum``. The run's ``metacells.h5ad`` adds per-prototype
        statistics.
        """
        n_prototypes = self.module.hparams.n_prototypes
        scale = np.asarray(self.registry.get("prototype_norms", np.ones(n_prototypes)))
        n_reference = len(self.registry.get("reference_studies", self.studies))
        expression, normalised = decode_prototypes(
            self.module, scale, n_reference, self.spec.target_sum
        )
        result = ad.AnnData(
            X=expression.astype(np.float32),
            obs=pd.DataFrame(index=[f"prototype_{k}" for k in range(n_prototypes)]),
            var=pd.DataFrame(index=list(self.spec.genes)),
        )
        result.layers["normalized"] = normalised.astype(np.float32)
        return result

    def label_predictions(
        self, prototype: np.ndarray, similarity: np.ndarray, threshold: float | None = None
    ) -> pd.DataFrame:
        """Labels of the nearest prototypes, with uncertainty 1 − max(similarity, 0) × the
        prototype's label confidence; above ``threshold`` the label is 'unknown'."""
        if "prototype_labels" not in self.registry:
            raise ScProtoInputError(
                "This model has no prototype labels: it was trained without `data.label_key`."
            )
        labels = np.asarray(self.registry["prototype_labels"], dtype=object)
        confidence = np.asarray(self.registry["prototype_label_confidence"], dtype=float)
        uncertainty = 1.0 - np.clip(similarity, 0.0, 1.0) * np.nan_to_num(confidence[prototype])
        if threshold is None:
            threshold = self.registry.get("label_uncertainty_threshold", 0.7)
        predicted = np.where(uncertainty > threshold, "unknown", labels[prototype])
        return pd.DataFrame({"predicted_label": predicted, "label_uncertainty": uncertainty})

    def predict_labels(self, adata: ad.AnnData, threshold: float | None = None) -> pd.DataFrame:
        """Cell-type label of every cell from its nearest prototype (label transfer).

        >>> adata.obs[["predicted_label", "label_uncertainty"]] = model.predict_labels(adata).values
        """
        frame = self.label_predictions(*self.assign_prototypes(adata), threshold=threshold)
        frame.index = adata.obs_names
        return frame
