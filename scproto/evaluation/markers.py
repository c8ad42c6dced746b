"""Marker-gene classification (paper Fig. 2): can a linear classifier trained on reference
cells tell two cell types apart in the query from a few marker genes, when the features are
the cell's own (noisy, sparse) expression, its nearest prototype's metacell, or its
embedding?"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURE_SETS = ("single_cell", "metacell", "embedding")


@dataclass(frozen=True)
class MarkerTask:
    """Two (or more) classes, each matching any of several label spellings, and the genes."""

    name: str
    genes: tuple[str, ...]
    classes: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_config(cls, name: str, spec: Mapping) -> "MarkerTask":
        classes = {str(c): tuple(str(a) for a in aliases) for c, aliases in spec["classes"].items()}
        return cls(name, tuple(str(g) for g in spec["genes"]), classes)

    def class_of(self, labels: pd.Series) -> pd.Series:
        """The task class of each cell, NaN for cells of other types."""
        lookup = {alias: name for name, aliases in self.classes.items() for alias in aliases}
        return labels.astype(str).map(lookup)

    def skip_reason(
        self, genes: Sequence[str], classes: pd.Series, is_reference: np.ndarray
    ) -> str | None:
        """Why the task cannot run: genes not in the model, classes missing on either side."""
        missing = [g for g in self.genes if g not in set(genes)]
        if missing:
            return f"genes {missing} are not among the model's genes"
        for side, mask in (("reference", is_reference), ("query", ~is_reference)):
            if not mask.any():
                return f"there are no {side} cells"
            absent = [c for c in self.classes if c not in set(classes[mask].dropna())]
            if absent:
                return (
                    f"no {side} cells labelled {absent} (accepted labels: "
                    + ", ".join(f"{c}: {list(self.classes[c])}" for c in absent)
                    + ")"
                )
        return None


def linear_classification(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Standardised logistic regression; macro and micro F1 and the correctly labelled cells
    of the test set (micro F1 equals accuracy for single-label classes)."""
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed)
    )
    classifier.fit(train_x, train_y)
    predicted = classifier.predict(test_x)
    correct = int((predicted == test_y).sum())
    return {
        "f1_macro": float(f1_score(test_y, predicted, average="macro")),
        "f1_micro": float(f1_score(test_y, predicted, average="micro")),
        "n_correct": float(correct),
        "n_test": float(len(test_y)),
    }


def marker_task_scores(
    task: MarkerTask,
    *,
    expression: pd.DataFrame,
    metacell_expression: pd.DataFrame,
    prototype: np.ndarray,
    latent: np.ndarray,
    classes: pd.Series,
    is_reference: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Scores per feature set. ``expression`` is cells × genes (model input scale),
    ``metacell_expression`` prototypes × genes, ``prototype`` each cell's nearest one."""
    in_task = classes.notna().to_numpy()
    features = {
        "single_cell": expression[list(task.genes)].to_numpy(),
        "metacell": metacell_expression[list(task.genes)].to_numpy()[prototype],
        "embedding": np.asarray(latent),
    }
    y = classes.to_numpy()
    train, test = in_task & is_reference, in_task & ~is_reference
    return {
        name: linear_classification(x[train], y[train], x[test], y[test])
        for name, x in features.items()
    }
