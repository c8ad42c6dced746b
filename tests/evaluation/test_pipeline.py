"""Evaluation end to end: a run with `eval=full` writes metrics.json, report.md and figures;
`evaluate.py` reproduces them; missing batches or labels skip components with reasons."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scproto.evaluate import evaluate_run
from scproto.evaluation import evaluate, read_run
from scproto.evaluation.pipeline import is_evaluation_key
from scproto.train import CONFIG_DIR, train
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("umap_prototypes", "markers_nk_vs_cd8", "markers_cd4_vs_cd8", "marker_f1", "loss_curves")
REQUIRED_KEYS = (
    [
        f"{prefix}{key}"
        for prefix in ("", "pca/")
        for key in (
            "scib/total",
            "scib/batch",
            "scib/bio",
            "scib/bras",
            "scib/batch_asw",
            "scib/total_with_asw",
            "scgraph/rank_pca",
            "scgraph/corr_pca",
            "scgraph/corr_weighted",
        )
    ]
    + [
        f"markers/{task}/{features}/{metric}"
        for task in ("nk_vs_cd8", "cd4_vs_cd8")
        for features in ("single_cell", "metacell", "embedding")
        for metric in ("f1_macro", "f1_micro", "n_correct")
    ]
    + [
        "coverage/types_without_prototype",
        "coverage/prototypes_non_empty",
        "coverage/purity_mean",
        "coverage/study_mixing_mean",
        "time/eval_s",
        "train/loss",
    ]
)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, small_adata):
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    cfg = compose_config(run_dir, ["eval=full", "eval.progress_bar=false", "logger=csv"])
    metrics, _ = train(cfg)
    # what Hydra would have written beside the outputs; evaluate.py reads it
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, metrics


def test_run_writes_metrics_report_and_figures(evaluated_run):
    run_dir, metrics = evaluated_run
    written = json.loads((run_dir / "metrics.json").read_text())
    missing = [key for key in REQUIRED_KEYS if key not in written]
    assert not missing, missing
    for key, value in metrics.items():  # the file holds what train() returned; NaN as null
        expected = None if isinstance(value, float) and value != value else value
        assert written[key] == (pytest.approx(expected) if expected is not None else None), key
    for key in REQUIRED_KEYS:
        value = written[key]
        assert value is None or isinstance(value, float | int), key
    assert 0 <= written["scib/total"] <= 1 and 0 <= written["pca/scib/total"] <= 1
    report = (run_dir / "report.md").read_text()
    for name in FIGURES:
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 10_000, name
        assert f"figures/{name}.png" in report
    assert "| scProto |" in report and "| PCA (50 PCs) |" in report
    for table in ("scib", "scgraph", "coverage", "markers"):
        assert (run_dir / f"{table}.csv").is_file()


def test_evaluate_reproduces_metrics_json(evaluated_run):
    run_dir, _ = evaluated_run
    before = json.loads((run_dir / "metrics.json").read_text())
    after = evaluate_run(run_dir)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert set(written) == set(before)
    for key, value in before.items():
        if key.startswith("time/"):
            continue
        assert written[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert after["train/loss"] == before["train/loss"]  # training numbers kept


def test_evaluate_cli_refuses_a_directory_that_is_no_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "must be a directory written by `python train.py`" in result.stderr
    assert "Traceback" not in result.stderr


def eval_settings(**changes):
    cfg = OmegaConf.load(CONFIG_DIR / "eval" / "full.yaml")
    cfg.scib.enabled = False  # the skips under test come before any JAX work
    cfg.progress_bar = False
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_one_batch_skips_integration_metrics(evaluated_run, tmp_path):
    run_dir, _ = evaluated_run
    inputs = read_run(run_dir, _expression(run_dir), seed=0)
    obs = inputs.obs.copy()
    obs[inputs.batch_key] = "only_study"
    one_batch = dataclasses.replace(inputs, obs=obs)
    metrics = evaluate(one_batch, eval_settings(**{"scib.enabled": True}), tmp_path)
    assert "only one batch" in metrics["skipped/scib"]
    assert "only one batch" in metrics["skipped/scgraph"]
    assert not any(k.startswith(("scib/", "scgraph/")) for k in metrics)
    assert "coverage/types" in metrics  # label-based parts still run
    assert "## Skipped" in (tmp_path / "report.md").read_text()


def test_no_labels_skips_label_metrics_and_still_draws(evaluated_run, tmp_path):
    run_dir, _ = evaluated_run
    inputs = read_run(run_dir, _expression(run_dir), seed=0)
    unlabelled = dataclasses.replace(inputs, label_key=None)
    metrics = evaluate(unlabelled, eval_settings(**{"scib.enabled": True}), tmp_path)
    for component in ("scib", "scgraph", "coverage", "markers"):
        assert "no cell-type labels" in metrics[f"skipped/{component}"], component
    assert (tmp_path / "figures" / "umap_prototypes.png").is_file()
    assert all(is_evaluation_key(k) for k in metrics)


def test_marker_task_with_absent_genes_is_skipped_with_reason(evaluated_run, tmp_path):
    run_dir, _ = evaluated_run
    inputs = read_run(run_dir, _expression(run_dir), seed=0)
    cfg = eval_settings(**{"figures.enabled": False, "scgraph.enabled": False})
    cfg.markers.tasks = {
        "odd": {"genes": ["NOT_A_GENE", "CD8A"], "classes": {"x": ["NK"], "y": ["CD8 T"]}}
    }
    metrics = evaluate(inputs, cfg, tmp_path)
    assert "['NOT_A_GENE'] are not among the model's genes" in metrics["skipped/markers/odd"]


def test_scib_above_its_cap_runs_on_a_stratified_subsample(evaluated_run, tmp_path, monkeypatch):
    import pandas as pd

    import scproto.evaluation.pipeline as pipeline

    seen = {}

    def scib_scores(embeddings, batches, labels, pca, progress_bar):
        seen.update(n=len(batches), rows={k: len(v) for k, v in embeddings.items()}, pca=len(pca))
        seen["types"] = labels.nunique()
        return pd.DataFrame({"total": [0.5]}, index=["scproto"])

    monkeypatch.setattr(pipeline, "scib_scores", scib_scores)
    run_dir, _ = evaluated_run
    inputs = read_run(run_dir, _expression(run_dir), seed=0)
    cfg = eval_settings(**{"scib.enabled": True, "scib.max_cells": 300, "figures.enabled": False})
    metrics = evaluate(inputs, cfg, tmp_path)
    assert seen["rows"] == {"scproto": seen["n"], "pca": seen["n"]} and seen["pca"] == seen["n"]
    assert 290 <= seen["n"] <= 310 and metrics["eval/scib_cells"] == seen["n"]
    assert seen["types"] == inputs.labels.nunique()  # every type kept by the stratification
    assert metrics["eval/cells"] == len(inputs.obs)  # the other components saw every cell
    assert "stratified subsample of" in (tmp_path / "report.md").read_text()


def _expression(run_dir: Path):
    from scproto.api import ScProto
    from scproto.train import load_data

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return ScProto.load(run_dir / "checkpoints" / "last.ckpt").model_input(load_data(cfg.data))


def test_a_prototype_is_drawn_at_the_cell_nearest_its_decoding_point():
    """Cell 2 is nearest the point; cell 0 has the prototype's direction but lies far out."""
    import numpy as np

    from scproto.evaluation.figures import place_prototypes

    latent = np.array([[5.0, 0.0], [0.0, 1.0], [1.0, 0.3]])
    cell_xy = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    prototypes, points = np.array([[1.0, 0.0]]), np.array([[1.0, 0.4]])
    np.testing.assert_array_equal(place_prototypes(cell_xy, latent, prototypes, points), [[30, 30]])
    np.testing.assert_array_equal(place_prototypes(cell_xy, latent, prototypes, None), [[10, 10]])
