"""Experiment tracking beyond Lightning's per-step logging: the run's full config, the
evaluation results and figures at the end, and closing W&B runs also after a crash."""

import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

import scproto
from scproto.run.directory import FIGURES, HISTORY, RESULT_TABLES, atomic_path


def log_config(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """The composed Hydra config and the package version, in every logger."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": config, "scproto_version": scproto.__version__})


def wandb_runs(trainer: pl.Trainer) -> list[Any]:
    """The W&B runs this trainer logs to (none without `logger=wandb`; rank 0 only)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_results(trainer: pl.Trainer, metrics: dict[str, float], run_dir: Path) -> None:
    """Evaluation metrics as the run's summary, its tables and figures as W&B media."""
    runs = wandb_runs(trainer)
    if not runs:
        return
    import wandb

    media: dict[str, Any] = {}
    for name in RESULT_TABLES:
        path = run_dir / f"{name}.csv"
        if path.exists():
            media[f"eval/{name}"] = wandb.Table(dataframe=pd.read_csv(path))
    for figure in sorted((run_dir / FIGURES).glob("*.png")):
        media[f"figures/{figure.stem}"] = wandb.Image(str(figure))
    for run in runs:
        run.summary.update(metrics)
        if media:
            run.log(media)


def finish_wandb(exit_code: int) -> None:
    """Close the active W&B run, if any, so the next job of a sweep opens its own."""
    wandb = sys.modules.get("wandb")  # never imported: no run can be open
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def set_aside_metrics_log(run_dir: Path) -> Path | None:
    """Move an interrupted run's per-step log out of the way of the resumed run's CSV
    logger, which deletes an existing metrics.csv when it starts."""
    path = run_dir / HISTORY
    if not path.is_file():
        return None
    aside = path.with_name("metrics.interrupted.csv")
    os.replace(path, aside)
    return aside


def join_metrics_log(run_dir: Path, aside: Path, resumed_step: int) -> None:
    """One metrics.csv for the whole run: the interrupted run's rows before the step the
    resume started from (later ones were trained again), then the resumed run's."""
    path = run_dir / HISTORY
    before = pd.read_csv(aside)
    parts = [before[before["step"] < resumed_step]]
    if path.is_file():
        parts.append(pd.read_csv(path))
    with atomic_path(path) as temporary:
        pd.concat(parts, ignore_index=True).to_csv(temporary, index=False)
    aside.unlink()
