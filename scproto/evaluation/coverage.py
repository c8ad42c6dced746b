"""Prototype coverage: does every cell type own a prototype, how big and pure are the
prototypes, and do they mix studies?"""

import numpy as np
import pandas as pd


def prototype_coverage(
    prototypes: pd.DataFrame,
    cell_labels: pd.Series,
    cell_prototype: np.ndarray,
    n_studies: int,
    min_cells: int = 10,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Summary numbers and a per-type table.

    ``prototypes`` is the metacell table's obs (``n_cells``, ``is_empty``, ``label_top10``,
    ``label_assigned``, ``purity``, ``study_entropy``), computed on reference cells whose
    labels are ``cell_labels`` and nearest prototypes ``cell_prototype``. A type is covered
    when it is the label (majority of the 10 most similar cells, SPEC §5) of at least one
    prototype; only types with ≥ ``min_cells`` cells are expected to be covered. Study mixing is the entropy of a prototype's study
    composition over ln(number of studies): 0 for one study, 1 for an even mix.
    """
    cell_labels = cell_labels.astype(object).where(cell_labels.notna(), None)
    counts = cell_labels.dropna().astype(str).value_counts()
    expected = counts[counts >= min_cells]
    prototypes = prototypes.astype({"label_top10": str, "label_assigned": str})
    used = prototypes[~prototypes["is_empty"].astype(bool)]
    per_type = pd.DataFrame(
        {
            "n_cells": expected,
            "prototypes": prototypes["label_top10"].value_counts().reindex(expected.index),
            "non_empty_prototypes": used["label_top10"].value_counts().reindex(expected.index),
        }
    )
    per_type = per_type.fillna(0).astype(int)
    # share of a type's cells whose nearest prototype's majority type is theirs
    labels = cell_labels.astype(str).to_numpy()
    recovered = pd.Series(prototypes["label_assigned"].to_numpy()[cell_prototype] == labels)
    per_type["cells_recovered"] = recovered.groupby(labels).mean().reindex(expected.index)
    per_type.index.name = "cell_type"
    size = used["n_cells"].to_numpy(dtype=float)
    mixing = (
        used["study_entropy"].to_numpy(dtype=float) / np.log(n_studies)
        if n_studies > 1
        else np.full(len(used), np.nan)
    )
    summary = {
        "coverage/types": float(len(expected)),
        "coverage/types_without_prototype": float((per_type["prototypes"] == 0).sum()),
        "coverage/types_without_non_empty_prototype": float(
            (per_type["non_empty_prototypes"] == 0).sum()
        ),
        "coverage/prototypes_non_empty": float(len(used)),
        "coverage/prototypes_empty": float(len(prototypes) - len(used)),
        "coverage/prototypes_in_use_share": float(len(used) / len(prototypes)),
        "coverage/prototype_size_median": float(np.median(size)) if len(size) else np.nan,
        "coverage/prototype_size_max": float(size.max()) if len(size) else np.nan,
        # purity and mixing weighted by size: what a random cell's prototype looks like
        "coverage/purity_mean": float(np.average(used["purity"], weights=size))
        if len(size)
        else np.nan,
        "coverage/study_mixing_mean": float(np.average(mixing, weights=size))
        if len(size)
        else np.nan,
    }
    return summary, per_type
