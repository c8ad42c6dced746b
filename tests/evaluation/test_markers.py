"""Marker-gene tasks: F1 on constructed cases with known answers; skipping with reasons."""

import numpy as np
import pandas as pd
import pytest

from scproto.evaluation.markers import MarkerTask, linear_classification, marker_task_scores

TASK = MarkerTask.from_config(
    "a_vs_b", {"genes": ["GA", "GB"], "classes": {"A": ["A cells", "A"], "B": ["B"]}}
)


def separable(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Class A expresses gene 0, class B gene 1."""
    y = np.array(["A"] * n + ["B"] * n)
    x = np.where(y[:, None] == "A", [3.0, 0.0], [0.0, 3.0]) + rng.normal(0, 0.3, (2 * n, 2))
    return x, y


def test_f1_known_answer():
    rng = np.random.default_rng(0)
    train_x, train_y = separable(50, rng)
    # 4 A and 4 B test cells; one A cell looks like B, so it is called B
    test_x = np.array([[3, 0], [3, 0], [3, 0], [0, 3], [0, 3], [0, 3], [0, 3], [0, 3]], float)
    test_y = np.array(["A"] * 4 + ["B"] * 4)
    scores = linear_classification(train_x, train_y, test_x, test_y)
    f1_a = 2 * 3 / (2 * 3 + 1)  # TP 3, FN 1, FP 0
    f1_b = 2 * 4 / (2 * 4 + 1)  # TP 4, FN 0, FP 1
    assert scores["f1_macro"] == pytest.approx((f1_a + f1_b) / 2)
    assert scores["f1_micro"] == pytest.approx(7 / 8)
    assert scores["n_correct"] == 7 and scores["n_test"] == 8


def test_metacell_features_come_from_the_nearest_prototype():
    """Single cells carry no signal; their prototypes' metacells separate the classes."""
    rng = np.random.default_rng(1)
    n = 40
    labels = pd.Series(["A cells"] * n + ["B"] * n + ["other"] * 10)
    classes = TASK.class_of(labels)
    assert classes.isna().sum() == 10 and set(classes.dropna()) == {"A", "B"}
    noise = pd.DataFrame(rng.normal(size=(len(labels), 2)), columns=["GA", "GB"])
    metacells = pd.DataFrame([[2.0, 0.1], [0.1, 2.0], [1.0, 1.0]], columns=["GA", "GB"])
    prototype = np.r_[np.zeros(n, int), np.ones(n, int), np.full(10, 2)]
    is_reference = np.tile([True, False], len(labels) // 2)
    scores = marker_task_scores(
        TASK,
        expression=noise,
        metacell_expression=metacells,
        prototype=prototype,
        latent=noise.to_numpy(),
        classes=classes,
        is_reference=is_reference,
    )
    assert scores["metacell"]["f1_macro"] == 1.0
    assert scores["metacell"]["n_test"] == n  # half of the 2n task cells; "other" left out
    assert scores["single_cell"]["f1_macro"] < 0.8  # noise


def test_skip_reasons_name_the_problem():
    labels = pd.Series(["A", "B", "A", "B"])
    classes = TASK.class_of(labels)
    reference = np.array([True, True, False, False])
    assert TASK.skip_reason(["GA", "GB"], classes, reference) is None
    assert "['GB']" in TASK.skip_reason(["GA"], classes, reference)
    assert "no query cells labelled ['B']" in TASK.skip_reason(
        ["GA", "GB"], TASK.class_of(pd.Series(["A", "B", "A", "A"])), reference
    )
    assert "no query cells" in TASK.skip_reason(["GA", "GB"], classes, np.ones(4, bool))
