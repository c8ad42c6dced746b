"""`python benchmark.py`: Table 1. Every method trains on the same genes of the reference
studies, maps the query studies its own way, and is scored by the project's evaluation
with identical settings (``../shared/BENCHMARK_PROTOCOL.md``).

Outputs in the run directory: ``prepared.h5ad`` (the shared input), ``<method>/seed_<s>.npy``
(each embedding), ``table.csv`` (one row per method × seed), ``table.md`` (mean ± sd,
best in bold) and ``table.png`` (scIB total against Corr-Weighted).
"""

import logging
import multiprocessing
import os
import resource
import time
from pathlib import Path

import anndata as ad
import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from scproto.benchmark.methods import METHODS, Context
from scproto.data.io import without_empty_cells_and_genes
from scproto.data.preprocess import (
    as_csr32,
    highly_variable_genes,
    log_normalized,
    looks_like_counts,
    source_matrix,
)
from scproto.errors import ScProtoInputError
from scproto.evaluate import evaluate_run
from scproto.evaluation.inputs import baseline_pca
from scproto.evaluation.scgraph import configured_reference, scgraph_scores
from scproto.evaluation.scib import scib_scores, skip_reason, use_jax_platform
from scproto.run.directory import atomic_path
from scproto.run.hydra import exit_with_message
from scproto.run.quiet import quiet_third_party
from scproto.run.settings import CONFIG_DIR
from scproto.train import load_data

log = logging.getLogger(__name__)

# table.csv's score columns, named as in metrics.json; higher is better unless listed in LOWER
SCORES = (
    "scib/total",
    "scib/batch",
    "scib/bio",
    "scgraph/rank_pca",
    "scgraph/corr_pca",
    "scgraph/corr_weighted",
    "labels/knn_f1_macro",
    "labels/prototype_f1_macro",
    "coverage/types_without_non_empty_prototype",
    "coverage/prototypes_in_use_share",
    "time/train_s",
    "memory/peak_rss_mb",
)
LOWER = ("coverage/types_without_non_empty_prototype", "time/train_s", "memory/peak_rss_mb")
DIGITS = {"time/train_s": 1, "memory/peak_rss_mb": 0}


def prepare(
    adata: ad.AnnData,
    *,
    batch_key: str,
    counts_layer: str | None,
    query_studies: list[str],
    n_top_genes: int,
) -> tuple[ad.AnnData, ad.AnnData]:
    """(the shared input on the HVGs, the log-normalised expression of all genes).

    HVGs: scanpy's ``seurat`` flavour on the log-normalised reference cells. Cells without
    counts in those genes are dropped for every method alike.
    """
    counts = source_matrix(adata, counts_layer) if counts_layer else adata.X
    if not looks_like_counts(counts):
        raise ScProtoInputError(
            "The benchmark's count models (scVI, scPoli) need raw counts: set "
            "`data.counts_layer` to the layer that holds them."
        )
    counts = as_csr32(counts)
    expression = log_normalized(counts, is_counts=True, target_sum=1e4)
    studies = adata.obs[batch_key].astype(str)
    reference = ~studies.isin(query_studies).to_numpy()
    genes = highly_variable_genes(
        expression[reference], adata.var_names, n_top_genes=n_top_genes, flavor="seurat"
    )
    columns = adata.var_names.get_indexer(genes)
    prepared = ad.AnnData(
        X=expression[:, columns],
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    prepared.layers["counts"] = counts[:, columns]
    prepared.obs["split"] = pd.Categorical(
        np.where(reference, "reference", "query"), categories=["reference", "query"]
    )
    keep = np.asarray(prepared.layers["counts"].sum(axis=1)).ravel() > 0
    prepared = without_empty_cells_and_genes(prepared[keep].copy(), min_genes=1)
    everything = ad.AnnData(X=expression[keep], obs=prepared.obs, var=adata.var[[]].copy())
    return prepared, everything


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux keeps ``ru_maxrss`` across exec, so a
    spawned worker would report its parent's peak; ``VmHWM`` starts anew with the process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embed_in_fresh_process(method: str, prepared: Path, context: Context) -> dict:
    """Run one method in this (fresh) process; its training time and peak memory."""
    data = ad.read_h5ad(prepared)
    start = time.perf_counter()
    embedded = METHODS[method](data, context)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    return {
        "latent": np.asarray(embedded.latent, dtype=np.float32),
        "epochs": embedded.epochs,
        "extra": embedded.extra,
        "time/train_s": seconds,
        "memory/peak_rss_mb": peak_mb,
    }


def run_method(method: str, prepared: Path, context: Context) -> dict:
    """``embed_in_fresh_process`` in a spawned process: timing and memory of that method alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(embed_in_fresh_process, (method, prepared, context))


def knn_f1(latent: np.ndarray, labels: pd.Series, is_reference: np.ndarray, k: int) -> float:
    """Macro F1 on the query cells of a k-NN classifier fitted on the reference cells."""
    known = labels.notna().to_numpy()
    train, test = is_reference & known, ~is_reference & known
    if not test.any() or not train.any():
        return float("nan")
    classifier = KNeighborsClassifier(n_neighbors=min(k, int(train.sum())))
    classifier.fit(latent[train], labels[train].astype(str))
    return float(
        f1_score(labels[test].astype(str), classifier.predict(latent[test]), average="macro")
    )


def score(
    results: dict[str, dict],
    prepared: ad.AnnData,
    everything: ad.AnnData,
    cfg: DictConfig,
) -> pd.DataFrame:
    """One row per method: scIB (one Benchmarker call for all), scGraph, label transfer."""
    batch_key, label_key = cfg.data.batch_key, cfg.data.label_key
    batches, labels = prepared.obs[batch_key], prepared.obs[label_key]
    embeddings = {name: result["latent"] for name, result in results.items()}
    rows = pd.DataFrame(index=list(results))
    if skip_reason(batches, labels) is None:
        use_jax_platform(cfg.eval.jax_platform)
        pre = baseline_pca(prepared.X, 50, seed=0)
        table = scib_scores(embeddings, batches, labels, pre, progress_bar=False)
        for column in ("total", "batch", "bio"):
            rows[f"scib/{column}"] = table[column]
        settings = cfg.eval.scgraph
        expression = everything.copy()
        expression.obs = pd.DataFrame(
            {"batch": batches.astype(str).to_numpy(), "label": labels.astype(str).to_numpy()},
            index=expression.obs_names,
        )
        reference = configured_reference(expression, settings)
        graph = scgraph_scores(embeddings, expression.obs["label"], reference, settings.trim)
        for column in graph.columns:
            rows[f"scgraph/{column}"] = graph[column]
    is_reference = (prepared.obs["split"] == "reference").to_numpy()
    for name, result in results.items():
        rows.loc[name, "labels/knn_f1_macro"] = knn_f1(
            result["latent"], labels, is_reference, cfg.benchmark.knn_k
        )
        if "prototype_labels" in result["extra"]:
            predicted = pd.Series(result["extra"]["prototype_labels"])
            test = ~is_reference & labels.notna().to_numpy()
            rows.loc[name, "labels/prototype_f1_macro"] = float(
                f1_score(labels[test].astype(str), predicted[test], average="macro")
            )
        for key in ("time/train_s", "memory/peak_rss_mb", "epochs"):
            rows.loc[name, key] = result[key]
        if "run_dir" in result["extra"]:
            run_cfg = OmegaConf.create(result["extra"]["config"])
            scores = prototype_scores(Path(result["extra"]["run_dir"]), run_cfg)
            for key, value in scores.items():
                rows.loc[name, key] = value
    return rows


def prototype_scores(run_dir: Path, cfg: DictConfig) -> dict[str, float]:
    """Coverage and the marker tasks' macro F1 (single cells, metacells) of the scProto run
    in ``run_dir`` made with ``cfg``, from the project's evaluation with everything else off."""
    eval_cfg = cfg.eval.copy()
    with open_dict(eval_cfg):
        eval_cfg.enabled, eval_cfg.subsample, eval_cfg.pca_baseline = True, None, False
        eval_cfg.scib.enabled = eval_cfg.scgraph.enabled = eval_cfg.figures.enabled = False
    metrics = evaluate_run(run_dir, eval_cfg, cfg=cfg)
    return {
        key: float(value)
        for key, value in metrics.items()
        if key.startswith("coverage/") or (key.startswith("markers/") and key.endswith("/f1_macro"))
    }


def summary_table(table: pd.DataFrame) -> str:
    """Mean ± sd over seeds per method, the best mean of each column in bold."""
    markers = sorted(c for c in table if c.startswith("markers/"))
    columns = [c for c in (*SCORES, *markers) if c in table and table[c].notna().any()]
    grouped = table.groupby("method", sort=False)
    means, sds = grouped[columns].mean(), grouped[columns].std()
    lines = [
        "| method | seeds | epochs | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for method in means.index:
        cells = []
        for column in columns:
            mean, sd = means.loc[method, column], sds.loc[method, column]
            if np.isnan(mean):
                cells.append("–")
                continue
            best = means[column].min() if column in LOWER else means[column].max()
            digits = DIGITS.get(column, 3)
            text = f"{mean:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")
            cells.append(f"**{text}**" if mean == best else text)
        seeds = grouped.get_group(method)["seed"]
        epochs = ", ".join(sorted(set(grouped.get_group(method)["epochs"].astype(str))))
        lines.append(f"| {method} | {len(seeds)} | {epochs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    if "scib/total" not in table or "scgraph/corr_weighted" not in table:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    colours = plt.get_cmap("tab20").colors  # ten colours repeat once a table has 11 rows
    markers = "osD^v"
    for i, (method, rows) in enumerate(table.groupby("method", sort=False)):
        x, y = rows["scib/total"], rows["scgraph/corr_weighted"]
        ax.errorbar(
            x.mean(), y.mean(), xerr=x.std() if len(x) > 1 else None,
            yerr=y.std() if len(y) > 1 else None, fmt=markers[i % len(markers)],
            color=colours[i % len(colours)], capsize=3, label=method,
        )  # fmt: skip
    ax.set_xlabel("scIB total")
    ax.set_ylabel("scGraph Corr-Weighted")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=150)
    plt.close(fig)


def experiment_name() -> str:
    """The ``experiment=`` choice (task_name is the benchmark's own), or the default data."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("experiment")
        if choice and choice != "null":
            return choice
    return "default data"


def describe_data(cfg: DictConfig, prepared: ad.AnnData) -> str:
    if cfg.data.source == "synthetic":
        settings = dict(cfg.data.synthetic)
        source = f"synthetic ({', '.join(f'{k}={v}' for k, v in settings.items())})"
    else:
        source = Path(cfg.data.path).name
    n_query = int((prepared.obs["split"] == "query").sum())
    return (
        f"{source}: {prepared.n_obs} cells ({n_query} in query studies "
        f"{', '.join(map(str, cfg.data.query_studies or []))}), {prepared.n_vars} genes"
    )


def describe_machine() -> str:
    import platform

    import torch

    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kb / 2**20:.0f} GB memory"
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores{memory}, {accelerator}"


def write_tables(table: pd.DataFrame, out_dir: Path, title: str, footer: str = "") -> None:
    with atomic_path(out_dir / "table.csv") as path:
        table.to_csv(path, index=False)
    with atomic_path(out_dir / "table.md") as path:
        path.write_text(
            f"# {title}\n\n{summary_table(table)}" + (f"\n{footer}\n" if footer else "")
        )
    plot_table(table, out_dir / "table.png")


def footer_of(part: Path) -> str:
    """The closing paragraph (data, machine, time) of a part's table.md."""
    path = part / "table.md"
    lines = path.read_text().strip().splitlines() if path.is_file() else []
    return lines[-1] if lines and not lines[-1].startswith("|") else ""


def joined(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows of ``tables`` in order; a later (method, seed) row replaces an earlier one."""
    return pd.concat(tables, ignore_index=True).drop_duplicates(["method", "seed"], keep="last")


def merge_parts(parts: list[str], out_dir: Path) -> pd.DataFrame:
    """``benchmark.methods=[]``: Table 1 from parts built earlier, each part's footer kept."""
    if not parts:
        raise ScProtoInputError(
            "benchmark.methods is empty and benchmark.merge names no parts: nothing to do."
        )
    tables = [pd.read_csv(Path(part) / "table.csv") for part in parts]
    table = joined(tables)
    methods = [", ".join(dict.fromkeys(t["method"])) for t in tables]
    footer = "\n\n".join(
        f"Part {i + 1} ({m}): {footer_of(Path(p))}"
        for i, (p, m) in enumerate(zip(parts, methods, strict=True))
    )
    write_tables(table, out_dir, title=f"Table 1: {experiment_name()}", footer=footer)
    return table


def run_benchmark(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Train and score ``benchmark.methods`` × ``benchmark.seeds``; write the tables."""
    settings = cfg.benchmark
    unknown = sorted(set(settings.methods) - set(METHODS))
    if unknown:
        raise ScProtoInputError(
            f"benchmark.methods: {unknown} unknown; choose from {', '.join(METHODS)}."
        )
    if not cfg.data.label_key:
        raise ScProtoInputError("The benchmark scores cell types: set `data.label_key`.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not settings.methods:
        return merge_parts(settings.merge or [], out_dir)
    start = time.perf_counter()
    adata = load_data(cfg.data)
    if cfg.data.query_studies is None:  # the synthetic generator marks its own query studies
        with open_dict(cfg):
            cfg.data.query_studies = list(adata.uns.get("query_studies", []))
    query = list(cfg.data.query_studies)
    prepared, everything = prepare(
        adata,
        batch_key=cfg.data.batch_key,
        counts_layer=cfg.data.counts_layer,
        query_studies=[str(s) for s in query],
        n_top_genes=settings.n_top_genes,
    )
    prepared_path = out_dir / "prepared.h5ad"
    with atomic_path(prepared_path) as path:
        prepared.write_h5ad(path)
    log.info("benchmark input: %d cells × %d genes, query %s", *prepared.shape, list(query))

    rows = []
    for seed in settings.seeds:
        results = {}
        for method in settings.methods:
            method_dir = out_dir / method / f"seed_{seed}"
            method_dir.mkdir(parents=True, exist_ok=True)
            context = Context(
                batch_key=cfg.data.batch_key,
                seed=int(seed),
                max_epochs=(settings.max_epochs or {}).get(method),
                out_dir=method_dir,
                prepared=prepared_path,
                scproto_config=cfg if method == "scproto" else None,
            )
            log.info("benchmark: %s, seed %s", method, seed)
            results[method] = run_method(method, prepared_path, context)
            np.save(out_dir / method / f"seed_{seed}.npy", results[method]["latent"])
        scores = score(results, prepared, everything, cfg)
        scores.insert(0, "seed", seed)
        rows.append(scores.rename_axis("method").reset_index())
    parts = [pd.read_csv(Path(part) / "table.csv") for part in settings.merge or []]
    table = joined([*reversed(parts), *rows])  # this run's rows win over earlier parts'
    minutes = (time.perf_counter() - start) / 60
    footer = (
        f"Data: {describe_data(cfg, prepared)}. Machine: {describe_machine()}; this run "
        f"{minutes:.0f} min. Seeds {', '.join(map(str, sorted(table['seed'].unique())))}; "
        "mean ± sd over seeds, best mean in bold. Scores as in BENCHMARK_PROTOCOL.md "
        "(scib-metrics raw, all cells; scGraph on all genes; k-NN F1 on query cells)."
    )
    write_tables(table, out_dir, title=f"Table 1: {experiment_name()}", footer=footer)
    log.info("benchmark tables in %s", out_dir)
    return table


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="benchmark")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    try:
        run_benchmark(cfg, Path(cfg.paths.output_dir))
    except ScProtoInputError as error:
        exit_with_message(error)
