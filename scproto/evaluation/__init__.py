"""Evaluation (SPEC §7): scIB, scGraph, marker-gene tasks, prototype coverage, figures."""

from scproto.evaluation.inputs import EvaluationInputs, read_run
from scproto.evaluation.pipeline import evaluate, write_metrics

__all__ = ["EvaluationInputs", "evaluate", "read_run", "write_metrics"]
