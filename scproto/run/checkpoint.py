"""Checkpoints that a run can resume from exactly: ``last.ckpt`` after every epoch.

Lightning saves the weights, optimiser, schedule and loop counters; the view sampler's
stream depends only on (seed, epoch). The file is written after the LightningModule's
``on_train_epoch_end`` (k-means after the warm-up, re-seeding unused prototypes), so it
holds the prototypes the next epoch starts from. What is left are the global random
states (dropout, the reparameterisation noise, the loader's seed), saved here as plain
tensors, lists and numbers so that checkpoints load with ``weights_only=True``: a file
carrying pickled objects is refused, never executed.
"""

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from scproto.errors import ScProtoInputError
from scproto.run.directory import CHECKPOINT, atomic_path
from scproto.run.hydra import train_command

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states in types ``weights_only`` loads."""
    # the legacy global state: what seed_everything seeds and third-party code may draw from
    name, keys, position, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read safely (``weights_only``), with messages that say what
    the file is instead of torch's advice to turn the safety off."""
    path = Path(path)
    if path.is_dir():
        raise ScProtoInputError(
            f"{path} is a directory; give the checkpoint file in it, e.g. {path / 'last.ckpt'}."
        )
    if not path.is_file():
        raise ScProtoInputError(f"Checkpoint not found: {path.resolve()}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, EOF, magic number: anything but a torch checkpoint
        if "Unsupported global" in str(error):  # a class torch will not construct
            raise ScProtoInputError(
                f"{path} holds pickled Python objects, which scproto does not load: they could "
                "run code. scproto's own checkpoints hold plain data only: retrain, or re-save "
                "the model with ScProto.save in a session you trust."
            ) from error
        raise ScProtoInputError(
            f"{path} is not a readable checkpoint ({type(error).__name__}); it is damaged or "
            "another kind of file. Give a run's checkpoints/last.ckpt."
        ) from error


# Module settings renamed to their config names (sinkhorn.n_iters, sinkhorn.hard) in 0.2.
RENAMED_SETTINGS = {"sinkhorn_iters": "n_iters", "hard_assignment": "hard"}


def stored_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The module settings of a checkpoint, under this version's names."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    settings = {RENAMED_SETTINGS.get(k, k): v for k, v in saved.items()}
    # before 0.3 the decoder was as wide as the encoder
    settings.setdefault("decoder_hidden_dim", settings.get("hidden_dim"))
    # before 0.3 a cell took the prototype of highest cosine
    settings.setdefault("assignment", "cosine")
    return settings


def check_resumable(checkpoint: dict[str, Any], module: pl.LightningModule, path: Path) -> None:
    """The checkpoint was written by a run with this run's model and loss settings."""
    saved = stored_settings(checkpoint)
    if "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise ScProtoInputError(
            f"ckpt_path={path} holds a model but no training state (a mapped or re-saved model); "
            f"resume from a training run's {CHECKPOINT}."
        )
    current = dict(module.hparams)
    differing = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
    if differing:
        listing = "; ".join(
            f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in differing
        )
        raise ScProtoInputError(
            f"ckpt_path={path} was trained with other settings ({listing}). Resume with the "
            "settings of the interrupted run (its .hydra/overrides.yaml lists them)."
        )


class EpochCheckpoint(Checkpoint):
    """Writes ``checkpoints/last.ckpt`` atomically at the end of every training epoch, with
    the random states; restores them on resume; says how to resume after Ctrl-C.

    A :class:`~pytorch_lightning.callbacks.Checkpoint`: Lightning calls those after the
    module's ``on_train_epoch_end``, other callbacks before it. As a plain callback it saved
    the prototypes from before that epoch's k-means or re-seeding, and a resume lost them.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_epoch: int | None = None
        self._restored_rng: dict[str, Any] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        save_checkpoint(trainer, self.path)
        self.saved_epoch = trainer.current_epoch

    def state_dict(self) -> dict[str, Any]:  # called while a checkpoint is written
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_rng = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Set here, just before the first epoch's loader is made, the way the interrupted
        # run stood when it wrote the checkpoint.
        if self._restored_rng is not None:
            set_rng_state(self._restored_rng)
            self._restored_rng = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            log.warning(interrupted_message(trainer, self.path, self.saved_epoch))


def save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` (collective under DDP; rank 0 writes), atomically."""
    if not trainer.is_global_zero:
        trainer.save_checkpoint(path, weights_only=False)
        return
    with atomic_path(path) as temporary:
        trainer.save_checkpoint(temporary, weights_only=False)  # the full training state


def interrupted_message(trainer: pl.Trainer, path: Path, saved_epoch: int | None) -> str:
    where = f"Interrupted in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}."
    if not path.is_file():
        return f"{where} No epoch had finished, so there is no checkpoint: start the run again."
    done = f"epoch {saved_epoch + 1}" if saved_epoch is not None else "the resumed epoch"
    command = train_command(ckpt_path=str(path), **{"hydra.run.dir": str(path.parents[1])})
    how = command or f"train(cfg) with ckpt_path={path} and the same paths.output_dir"
    return f"{where} {path} holds the model after {done}; resume with\n  {how}"
