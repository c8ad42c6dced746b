"""Prototype coverage on a hand-made prototype table."""

import numpy as np
import pandas as pd
import pytest

from scproto.evaluation.coverage import prototype_coverage


def test_coverage_counts_types_and_names_the_uncovered():
    # prototype 0: 30 A cells; 1: 10 A + 10 B (majority A); 2: empty, its top-10 label B;
    # type C (12 cells) sits in prototype 1's neighbourhood but labels nothing
    table = pd.DataFrame(
        {
            "n_cells": [30, 32, 0],
            "is_empty": [False, False, True],
            "label_top10": ["A", "A", "B"],
            "label_assigned": ["A", "A", ""],
            "purity": [1.0, 20 / 32, np.nan],
            "study_entropy": [0.0, np.log(2), np.nan],
        }
    )
    labels = pd.Series(["A"] * 50 + ["B"] * 10 + ["C"] * 12 + ["D"] * 3)
    prototype = np.r_[
        np.zeros(30, int), np.ones(20, int), np.ones(10, int), np.ones(12, int), [0, 0, 0]
    ]
    summary, per_type = prototype_coverage(table, labels, prototype, n_studies=2, min_cells=10)
    assert list(per_type.index) == ["A", "C", "B"]  # by size; D (3 cells) not expected
    assert per_type.loc["A", "prototypes"] == 2 and per_type.loc["B", "prototypes"] == 1
    assert per_type.loc["B", "non_empty_prototypes"] == 0
    assert per_type.loc["C", "prototypes"] == 0
    assert per_type.loc["A", "cells_recovered"] == 1.0 and per_type.loc["C", "cells_recovered"] == 0
    assert summary["coverage/types"] == 3
    assert summary["coverage/types_without_prototype"] == 1  # C
    assert summary["coverage/types_without_non_empty_prototype"] == 2  # B and C
    assert summary["coverage/prototypes_non_empty"] == 2
    assert summary["coverage/prototype_size_median"] == 31
    assert summary["coverage/purity_mean"] == pytest.approx((30 * 1 + 32 * 20 / 32) / 62)
    assert summary["coverage/study_mixing_mean"] == pytest.approx(32 / 62)  # 0 and 1
