"""The evaluation's figures (PNG): cells and prototypes on a UMAP, marker genes in single
cells vs metacells, marker-task F1, and the training curves of every loss term."""

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import faiss
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from matplotlib.lines import Line2D

from scproto.metacells import most_similar_cells, nearest_rows
from scproto.run.directory import atomic_path

DPI = 150
LOSS_PANEL_ORDER = [
    f"train/{name}"
    for name in (
        "loss",
        "loss_swav",
        "loss_prop",
        "loss_cvae",
        "loss_recon",
        "loss_kl",
        "swav_over_lnK",
        "prototypes_in_use",
        "assignment_entropy",
        "n_groups",
        "lr",
    )
]
PROTOTYPE_STYLE = {"marker": "*", "edgecolors": "black", "linewidths": 0.6, "zorder": 3}


def palette(categories: Sequence[str]) -> dict[str, str]:
    """Distinguishable colours: tab10, tab20, then scanpy's 102-colour palette."""
    n = len(categories)
    if n <= 10:
        colours = plt.get_cmap("tab10").colors
    elif n <= 20:
        colours = plt.get_cmap("tab20").colors
    else:
        colours = sc.pl.palettes.default_102
    return {
        c: matplotlib.colors.to_hex(colours[i % len(colours)]) for i, c in enumerate(categories)
    }


def umap_coordinates(points: np.ndarray, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """2-D UMAP of ``points``; the kNN comes from faiss (exact, and without pynndescent's
    minute of JIT compilation)."""
    import umap

    points = np.ascontiguousarray(points, dtype=np.float32)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(points)
    squared, neighbors = index.search(points, n_neighbors)
    reducer = umap.UMAP(
        n_neighbors=n_neighbors,
        random_state=seed,
        n_jobs=1,
        precomputed_knn=(neighbors, np.sqrt(np.maximum(squared, 0)), None),
    )
    with warnings.catch_warnings():  # it warns that .transform is unavailable: not needed
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return reducer.fit_transform(points)


def place_prototypes(
    cell_xy: np.ndarray, latent: np.ndarray, prototypes: np.ndarray, points: np.ndarray | None
) -> np.ndarray:
    """Each prototype at the 2-D position of the cell nearest its decoding point in μ (the
    point cells are assigned to), or of its most similar cell (cosine) for a run written
    without the points.

    UMAP cannot place new points without its own kNN index; embedding prototypes together
    with the cells pulls them into clumps of their own at the clusters' edges, and the mean
    position of several similar cells can fall between two islands.
    """
    if points is not None:
        return cell_xy[nearest_rows(points, latent, 1)[:, 0]]
    unit = latent / np.linalg.norm(latent, axis=1, keepdims=True).clip(1e-12)
    return cell_xy[most_similar_cells(prototypes, unit, 1)[:, 0]]  # blocks of prototypes


def _categorical_panel(ax, xy, values: pd.Series, title: str, colours: dict[str, str]) -> None:
    order = np.random.default_rng(0).permutation(len(xy))  # no category painted last on top
    ax.scatter(
        xy[order, 0],
        xy[order, 1],
        c=values.iloc[order].map(colours),
        s=3,
        linewidths=0,
        rasterized=True,
    )
    handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colours.items()]
    ax.legend(
        handles=handles,
        title=title,
        loc="upper left",
        bbox_to_anchor=(1, 1),
        frameon=False,
        fontsize=8,
    )


def _prototype_sizes(n_cells: np.ndarray) -> np.ndarray:
    return 40 + 260 * np.sqrt(n_cells / max(n_cells.max(), 1))


def plot_umap_prototypes(
    cell_xy: np.ndarray,
    prototype_xy: np.ndarray,
    *,
    cell_types: pd.Series | None,
    studies: pd.Series,
    prototype_labels: pd.Series | None,
    prototype_cells: np.ndarray,
    n_empty: int,
    path: Path,
) -> None:
    """Paper Fig. 3: cells coloured by type, by study and by density, the non-empty
    prototypes on top (stars sized by their cells; coloured by label in the type panel)."""
    panels = ["study", "density"] if cell_types is None else ["cell type", "study", "density"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 5.2))
    sizes = _prototype_sizes(prototype_cells)
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "cell type":
            colours = palette(sorted(cell_types.astype(str).unique()))
            _categorical_panel(ax, cell_xy, cell_types.astype(str), "cell type", colours)
            face = prototype_labels.astype(str).map(colours).fillna("white")
            ax.scatter(*prototype_xy.T, s=sizes, c=face, **PROTOTYPE_STYLE)
        elif panel == "study":
            colours = palette(sorted(studies.astype(str).unique()))
            _categorical_panel(ax, cell_xy, studies.astype(str), "study", colours)
            ax.scatter(*prototype_xy.T, s=sizes, c="white", **PROTOTYPE_STYLE)
        else:
            holder = ad.AnnData(obsm={"X_umap": cell_xy})
            sc.tl.embedding_density(holder, basis="umap")
            density = holder.obs["umap_density"].to_numpy()
            order = np.argsort(density)  # dense cells on top
            points = ax.scatter(
                *cell_xy[order].T,
                c=density[order],
                s=3,
                cmap="viridis",
                linewidths=0,
                rasterized=True,
            )
            fig.colorbar(points, ax=ax, shrink=0.6, label="cell density (scaled)")
            ax.scatter(*prototype_xy.T, s=sizes, c="white", **PROTOTYPE_STYLE)
        ax.set_title(f"by {panel}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    fig.suptitle(
        f"{len(prototype_xy)} prototypes in use (stars, sized by their cells, each on its most "
        f"similar cell); {n_empty} empty not shown"
    )
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI)
    plt.close(fig)


def plot_marker_scatter(
    task_name: str,
    genes: Sequence[str],
    cells: pd.DataFrame,
    cell_classes: pd.Series,
    metacells: pd.DataFrame,
    metacell_classes: pd.Series,
    metacell_cells: np.ndarray,
    path: Path,
) -> None:
    """Paper Fig. 2: the task's two marker genes in single cells (left; sparse, dropouts on
    the axes) and in the metacells of the prototypes labelled with the task's classes."""
    x_gene, y_gene = genes[:2]
    colours = palette(sorted(cell_classes.dropna().unique()))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    jitter = np.random.default_rng(0).normal(0, 0.03, (len(cells), 2))
    for name, colour in colours.items():
        mine = (cell_classes == name).to_numpy()
        axes[0].scatter(
            cells[x_gene].to_numpy()[mine] + jitter[mine, 0],
            cells[y_gene].to_numpy()[mine] + jitter[mine, 1],
            s=4,
            alpha=0.4,
            color=colour,
            linewidths=0,
            label=f"{name} ({mine.sum()} cells)",
            rasterized=True,
        )
        theirs = (metacell_classes == name).to_numpy()
        axes[1].scatter(
            metacells[x_gene].to_numpy()[theirs],
            metacells[y_gene].to_numpy()[theirs],
            s=_prototype_sizes(metacell_cells)[theirs] if theirs.any() else 40,
            color=colour,
            edgecolors="black",
            linewidths=0.5,
            label=f"{name} ({theirs.sum()} metacells)",
        )
    for ax, title in zip(
        axes, ("single cells", "metacells (prototypes, sized by cells)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel(f"{x_gene} (log-normalised)")
        _, texts = ax.get_legend_handles_labels()
        edge = "black" if ax is axes[1] else "none"
        handles = [  # one marker size in the legend, whatever the points' sizes
            Line2D([], [], marker="o", ls="", color=c, markeredgecolor=edge, markersize=7)
            for c in colours.values()
        ]
        ax.legend(handles, texts, frameon=False, fontsize=8)
    axes[0].set_ylabel(f"{y_gene} (log-normalised)")
    fig.suptitle(f"marker task {task_name}")
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI)
    plt.close(fig)


def plot_f1_bars(scores: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Macro F1 on the query per task (groups) and feature set (bars)."""
    tasks = list(scores)
    features = list(next(iter(scores.values())))
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(tasks), 4))
    width = 0.8 / len(features)
    colours = palette(features)
    for i, feature in enumerate(features):
        values = [scores[t][feature] for t in tasks]
        bars = ax.bar(
            np.arange(len(tasks)) + (i - (len(features) - 1) / 2) * width,
            values,
            width,
            label=feature.replace("_", " "),
            color=colours[feature],
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(tasks)), [t.replace("_", " ") for t in tasks])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("macro F1 on query cells")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1), title="features")
    ax.set_title("marker-gene classification")
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI)
    plt.close(fig)


def plot_loss_curves(history: pd.DataFrame, path: Path) -> None:
    """Every logged training series (``train/*``) against the step, one panel each."""
    logged = [c for c in history.columns if c.startswith("train/")]
    columns = [c for c in LOSS_PANEL_ORDER if c in logged] + sorted(
        set(logged) - set(LOSS_PANEL_ORDER)
    )
    n_cols = 4
    n_rows = int(np.ceil(len(columns) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.4 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        series = history[["step", column]].dropna()
        ax.plot(series["step"], series[column], lw=1)
        ax.set_title(column.removeprefix("train/"), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if column in ("train/loss_cvae", "train/loss_recon") and (series[column] > 0).all():
            ax.set_yscale("log")
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    fig.suptitle("training curves")
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=DPI)
    plt.close(fig)
