"""Shared fixtures: a small synthetic AnnData and composed, shrunk training configs."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from scproto.datasets.synthetic import make_synthetic
from scproto.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SMALL_SYNTHETIC = ["data.synthetic.n_cells=1500", "data.synthetic.n_genes=500"]
FAST = [
    "data.n_top_genes=500",
    "data.n_neighbors=15",
    "data.batch_size=128",
    "model.n_prototypes=20",
    "trainer.max_epochs=2",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "~logger",
]


# Genes of small_adata with any expression: the run drops the all-zero ones.
N_EXPRESSED_GENES = 474


@pytest.fixture(scope="session")
def small_adata() -> ad.AnnData:
    """1,500 cells × 500 genes, 4 studies (study_3 the query), raw counts in X."""
    return make_synthetic(n_cells=1500, n_genes=500, seed=0)


def compose_config(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The training config as `python train.py` would compose it, shrunk to run in seconds."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        on_files = any(o.startswith(("experiment=", "data=")) for o in overrides)
        shrink = [] if on_files else SMALL_SYNTHETIC
        # evaluation (a minute of JAX compilation) only where a test asks for it
        no_eval = [] if any(o.startswith("eval=") for o in overrides) else ["eval=none"]
        fast = [
            o
            for o in FAST
            if not (o == "~logger" and any(o.startswith("logger=") for o in overrides))
        ]
        cfg = compose(config_name="train", overrides=[*shrink, *fast, *no_eval, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(output_dir / "cache")
    return cfg


@pytest.fixture
def make_config(tmp_path):
    def factory(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config(run_dir or tmp_path / "run", list(overrides))

    return factory


def run_train_cli(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py OVERRIDES` from the project root, as a user runs it; must succeed."""
    done = subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
