"""`python evaluate.py run_dir=DIR`: evaluate a finished run again, without retraining.

The data are rebuilt from the run's own config (the synthetic data regenerated, or the
.h5ad re-read) and prepared by the saved model exactly as in training; metrics.json keeps
the run's training numbers and gets fresh evaluation ones.
"""

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from scproto.api import ScProto
from scproto.data.io import without_empty_cells_and_genes
from scproto.errors import ScProtoInputError
from scproto.evaluation import evaluate, read_run, write_metrics
from scproto.evaluation.pipeline import is_evaluation_key
from scproto.run.directory import METRICS
from scproto.run.hydra import exit_with_message
from scproto.run.quiet import quiet_third_party
from scproto.train import CONFIG_DIR, headline, load_data

log = logging.getLogger(__name__)


def run_config(run_dir: Path) -> DictConfig:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ScProtoInputError(
            f"{path} not found: `run_dir` must be a directory written by `python train.py`."
        )
    return OmegaConf.load(path)


def evaluate_run(
    run_dir: Path,
    eval_cfg: DictConfig | None = None,
    data_path: str | None = None,
    cfg: DictConfig | None = None,
) -> dict:
    """Re-evaluate ``run_dir`` with ``eval_cfg`` (default: the run's own settings); ``cfg``
    is the run's config where it has no ``.hydra/`` (a run made by ``train(cfg)`` in Python)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir) if cfg is None else cfg.copy()
    if eval_cfg is None:
        eval_cfg = cfg.get("eval") or OmegaConf.load(CONFIG_DIR / "eval" / "full.yaml")
    if data_path:
        with open_dict(cfg):
            cfg.data.path = data_path
    model = ScProto.load(run_dir / "checkpoints" / "last.ckpt")
    # the cells the run kept: all-zero ones dropped, names made unique, as in training
    adata = without_empty_cells_and_genes(load_data(cfg.data), min_genes=1)
    inputs = read_run(
        run_dir, model.model_input(adata), n_pcs=eval_cfg.pca_components, seed=cfg.seed
    )
    metrics_path = run_dir / METRICS
    previous = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics = {k: v for k, v in previous.items() if not is_evaluation_key(k)}
    metrics |= evaluate(inputs, eval_cfg, run_dir, seed=cfg.seed, title=cfg.get("task_name", ""))
    write_metrics(metrics, metrics_path)
    log.info("evaluation: %s; written to %s", headline(metrics), run_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    try:
        evaluate_run(Path(cfg.run_dir), cfg.get("eval"), cfg.data_path)
    except ScProtoInputError as error:
        exit_with_message(error)


if __name__ == "__main__":
    main()
