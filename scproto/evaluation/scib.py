"""scIB metrics through scib-metrics' `Benchmarker`, with batch ASW beside BRAS.

scib-metrics ≥ 0.5.6 scores batch correction with BRAS; the paper's table used batch ASW
(`silhouette_batch`). Both are reported: `batch` / `total` as the Benchmarker computes them,
and `batch_with_asw` / `total_with_asw` with ASW in BRAS's place. Scores are not min-max
scaled (`min_max_scale=False`): with two embeddings scaling would turn every metric into
0 or 1.
"""

import logging
from collections.abc import Mapping

import anndata as ad
import faiss
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Benchmarker's clean column names → metric keys in metrics.json
METRIC_KEYS = {
    "Isolated labels": "isolated_labels",
    "KMeans NMI": "kmeans_nmi",
    "KMeans ARI": "kmeans_ari",
    "Silhouette label": "silhouette_label",
    "cLISI": "clisi",
    "BRAS": "bras",
    "iLISI": "ilisi",
    "KBET": "kbet",
    "Graph connectivity": "graph_connectivity",
    "PCR comparison": "pcr_comparison",
    "Batch correction": "batch",
    "Bio conservation": "bio",
    "Total": "total",
}


def use_jax_platform(platform: str | None) -> None:
    """Pin JAX (scib-metrics' backend) to ``platform`` before its first use."""
    if platform:
        import jax

        jax.config.update("jax_platforms", platform)


def exact_neighbors(x: np.ndarray, k: int):
    """Exact k-NN (each cell first, as the Benchmarker's default pynndescent gives) via faiss;
    avoids pynndescent's JIT and the scanpy/pynndescent 0.7 incompatibility."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    squared, indices = index.search(x, k)
    return NeighborsResults(indices=indices, distances=np.sqrt(np.maximum(squared, 0)))


def skip_reason(batches: pd.Series, labels: pd.Series | None) -> str | None:
    """Why the scIB metrics cannot run on these cells, or None."""
    if labels is None:
        return "no cell-type labels (data.label_key is not set)"
    if batches.nunique() < 2:
        return f"only one batch ({batches.iloc[0]}); batch correction needs ≥ 2"
    return None


def drop_singleton_types(labels: pd.Series) -> np.ndarray:
    """Mask of cells whose cell type has ≥ 2 cells (silhouettes need two) and a label."""
    labels = labels.astype(object)
    counts = labels.value_counts()
    return (labels.notna() & labels.map(counts).fillna(0).ge(2)).to_numpy()


def scib_scores(
    embeddings: Mapping[str, np.ndarray],
    batches: pd.Series,
    labels: pd.Series,
    pre_integrated: np.ndarray,
    progress_bar: bool = True,
) -> pd.DataFrame:
    """One row per embedding: every default metric, the aggregates, batch ASW and the
    aggregates with ASW in BRAS's place."""
    import scib_metrics
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    keep = drop_singleton_types(labels)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(batches.astype(str).to_numpy()[keep]),
            "label": pd.Categorical(labels.astype(str).to_numpy()[keep]),
        },
        index=pd.Index(np.flatnonzero(keep).astype(str)),
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_pre"] = np.asarray(pre_integrated, dtype=np.float32)[keep]
    for name, x in embeddings.items():
        adata.obsm[name] = np.asarray(x, dtype=np.float32)[keep]
    benchmarker = Benchmarker(
        adata,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=list(embeddings),
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection(),
        pre_integrated_embedding_obsm_key="X_pre",
        progress_bar=progress_bar,
    )
    benchmarker.prepare(neighbor_computer=exact_neighbors)
    benchmarker.benchmark()
    table = benchmarker.get_results(min_max_scale=False, clean_names=True)
    table = table.drop(index="Metric Type").astype(float).rename(columns=METRIC_KEYS)

    batch_metrics = [
        c
        for c in table.columns
        if c in ("bras", "ilisi", "kbet", "graph_connectivity", "pcr_comparison")
    ]
    for name in embeddings:
        table.loc[name, "batch_asw"] = float(
            scib_metrics.silhouette_batch(
                adata.obsm[name], obs["label"].to_numpy(), obs["batch"].to_numpy()
            )
        )
    with_asw = [c if c != "bras" else "batch_asw" for c in batch_metrics]
    table["batch_with_asw"] = table[with_asw].mean(axis=1)
    table["total_with_asw"] = 0.4 * table["batch_with_asw"] + 0.6 * table["bio"]
    table.index.name = "embedding"
    return table
