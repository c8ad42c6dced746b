"""What the evaluation reads: a run's embedding, prototypes, metacells and training curves,
plus the model-input expression and its PCA (the baseline)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from scproto.data.preprocess import PCA_MAX_CELLS, randomized_pca
from scproto.errors import ScProtoInputError
from scproto.run.directory import EMBEDDING, HISTORY, METACELLS, PROTOTYPES

log = logging.getLogger(__name__)


@dataclass
class EvaluationInputs:
    obs: pd.DataFrame  # per cell: the study, the label (if any), split, nearest prototype
    batch_key: str
    label_key: str | None
    expression: sp.csr_matrix  # log-normalised model genes, as the model saw them
    genes: list[str]
    latent: np.ndarray  # μ
    pca: np.ndarray  # PCA of ``expression``: the baseline embedding
    prototypes: np.ndarray  # K × d, unit norm
    metacells: ad.AnnData  # K × genes, with the prototype table in obs
    history: pd.DataFrame | None  # training curves, when the CSV logger ran

    @property
    def is_reference(self) -> np.ndarray:
        return (self.obs["split"] == "reference").to_numpy()

    @property
    def labels(self) -> pd.Series | None:
        return self.obs[self.label_key] if self.label_key else None

    def subset(self, cells: np.ndarray) -> "EvaluationInputs":
        """The same run restricted to ``cells`` (indices); prototypes stay whole."""
        return EvaluationInputs(
            obs=self.obs.iloc[cells],
            batch_key=self.batch_key,
            label_key=self.label_key,
            expression=self.expression[cells],
            genes=self.genes,
            latent=self.latent[cells],
            pca=self.pca[cells],
            prototypes=self.prototypes,
            metacells=self.metacells,
            history=self.history,
        )


def baseline_pca(expression: sp.csr_matrix, n_components: int, seed: int) -> np.ndarray:
    """The paper's PCA row: a PCA of the same model input (all cells; components fitted
    on a subsample of a large atlas, as for the training graph)."""
    n_components = min(n_components, min(expression.shape) - 1)
    return randomized_pca(expression, n_components, seed=seed, max_fit_cells=PCA_MAX_CELLS)


def read_run(
    run_dir: Path, expression: sp.csr_matrix, *, n_pcs: int = 50, seed: int = 0
) -> EvaluationInputs:
    """The evaluation inputs of a finished run, given the model input of its cells."""
    run_dir = Path(run_dir)
    for name in (EMBEDDING, PROTOTYPES, METACELLS):
        if not (run_dir / name).is_file():
            raise ScProtoInputError(
                f"{run_dir} holds no {name}: is it the directory of a finished run?"
            )
    # obs, the latent and the run's notes only: X (the model input) is given
    with h5py.File(run_dir / EMBEDDING, "r") as file:
        obs = read_elem(file["obs"])
        latent = read_elem(file["obsm"]["X_scproto"])
        info = read_elem(file["uns"]["scproto"])
    if len(obs) != expression.shape[0]:
        raise ScProtoInputError(
            f"{run_dir / 'embedding.h5ad'} has {len(obs)} cells but the data has "
            f"{expression.shape[0]}: the run was made from other data."
        )
    metacells = ad.read_h5ad(run_dir / METACELLS)
    history = pd.read_csv(run_dir / HISTORY) if (run_dir / HISTORY).is_file() else None
    return EvaluationInputs(
        obs=obs,
        batch_key=info["batch_key"],
        label_key=info["label_key"] or None,
        expression=expression,
        genes=list(metacells.var_names),
        latent=latent,
        pca=baseline_pca(expression, n_pcs, seed),
        prototypes=np.load(run_dir / PROTOTYPES),
        metacells=metacells,
        history=history,
    )


def stratified_subsample(strata: pd.Series, n: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``n`` cells drawn in proportion to each stratum's size, at
    least one per stratum, so rare types and small studies stay represented."""
    if n >= len(strata):
        return np.arange(len(strata))
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(strata)
    chosen = []
    for code in range(len(uniques)):
        members = np.flatnonzero(codes == code)
        take = max(1, round(n * len(members) / len(strata)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))
