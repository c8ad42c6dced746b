"""What the command-line entry points share: the run-directory guard Hydra calls before
it writes anything, and how a user mistake ends (one message, exit code 2)."""

import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from scproto.errors import ScProtoInputError
from scproto.run.directory import MAP_QUERY_OUTPUTS, RunDirectory, refuse_training_run


class GuardRunDirectory(Callback):
    """Hydra callback, run before Hydra writes its ``.hydra/`` record and log file into
    ``hydra.run.dir``: refuse a directory whose outputs would be replaced (or, for
    ``map_query``, any training run's directory), check it is writable, and point an
    ``overwrite=true`` run at ``.overwrite/`` so the old run stays whole until the new one
    has finished."""

    def __init__(self, task: str = "train") -> None:
        self.task = task

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.guard(config)
        except ScProtoInputError as error:
            exit_with_message(error)

    def guard(self, config: DictConfig) -> None:
        directory = Path(config.hydra.run.dir)
        if self.task == "map_query":
            refuse_training_run(directory)
            outputs, resume = MAP_QUERY_OUTPUTS, None
        else:
            from scproto.run.directory import TRAIN_OUTPUTS

            outputs, resume = TRAIN_OUTPUTS, config.get("ckpt_path")
        run = RunDirectory.open(
            directory, outputs=outputs, overwrite=config.get("overwrite", False), resume=resume
        )
        if run.staged:  # Hydra's record and log go where the run writes
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(run.write_dir)


def log_to_files(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the run's log files only (the console shows it once, on stderr)."""
    record = logging.LogRecord("scproto", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_with_message(error: ScProtoInputError) -> None:
    message = f"scproto: error: {error}"
    log_to_files(message)
    print(f"\n{message}", file=sys.stderr)
    sys.exit(2)


def train_command(**replace: str) -> str | None:
    """The `python train.py` command of this Hydra run with ``replace``'s overrides set;
    None outside a Hydra run (the Python API)."""
    if not HydraConfig.initialized():
        return None
    overrides = HydraConfig.get().overrides.task
    kept = [o for o in overrides if o.split("=")[0].lstrip("+~") not in replace]
    return shlex.join(["python", "train.py", *kept, *(f"{k}={v}" for k, v in replace.items())])


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python <entry point> OVERRIDES`` composes, for the Python API (no
    Hydra run, so nothing under ``hydra:`` resolves). Works inside a user's own Hydra app:
    its global state is set aside and restored."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from scproto.run.settings import CONFIG_DIR

    state = GlobalHydra.instance()
    previous = state.hydra if state.is_initialized() else None
    state.clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    finally:
        if previous is not None:
            state.clear()
            state.initialize(previous)
