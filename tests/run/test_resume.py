"""Checkpoints every epoch, Ctrl-C and kill -9, and a resume equal to the uninterrupted run."""

import logging
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_lightning.callbacks import Checkpoint

import scproto.train as training
from scproto import ScProto, ScProtoInputError
from scproto.run.checkpoint import load_checkpoint
from tests.conftest import ROOT

EPOCHS = ["trainer.max_epochs=5"]


def with_callback(monkeypatch, callback: Checkpoint) -> None:
    """Add ``callback`` after the run's own. A Checkpoint, so that it runs where the run's
    EpochCheckpoint does (after the module's epoch end) and sees each epoch's file written."""
    build = training.build_trainer

    def build_with(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(callback)
        return trainer

    monkeypatch.setattr(training, "build_trainer", build_with)


class InterruptAt(Checkpoint):
    def __init__(self, epoch: int, exception: BaseException) -> None:
        self.epoch, self.exception = epoch, exception

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise self.exception


def embedding(run) -> np.ndarray:
    return ad.read_h5ad(run / "embedding.h5ad").obsm["X_scproto"]


def test_last_ckpt_is_written_after_every_epoch(make_config, monkeypatch, tmp_path):
    seen = []

    class Look(Checkpoint):
        def on_train_epoch_end(self, trainer, pl_module):
            checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
            seen.append((checkpoint["epoch"], checkpoint["global_step"], trainer.global_step))
            assert set(checkpoint["callbacks"]["EpochCheckpoint"]["rng"]) >= {"torch", "numpy"}

    with_callback(monkeypatch, Look())
    training.train(make_config(*EPOCHS))
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2, 3, 4]
    assert all(saved == current for _, saved, current in seen)


# Interrupted after epoch 3, whose end moves the prototypes in the second and third case.
PROTOTYPE_UPDATES = {
    "none": [],
    "k-means after the warm-up": ["model.prototype_init=kmeans", "model.cvae_warmup_epochs=3"],
    "re-seeding": ["model.reseed_prototypes=true"],
}


@pytest.mark.parametrize("update", PROTOTYPE_UPDATES)
def test_ctrl_c_says_how_to_resume_and_the_resumed_run_equals_the_uninterrupted(
    make_config, monkeypatch, tmp_path, caplog, update
):
    settings = [*EPOCHS, "logger=csv", *PROTOTYPE_UPDATES[update]]
    training.train(make_config(*settings, run_dir=tmp_path / "full"))
    with_callback(monkeypatch, InterruptAt(2, KeyboardInterrupt()))
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        training.train(make_config(*settings, run_dir=tmp_path / "cut"))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert f"Interrupted in epoch 3 of 5. {last} holds the model after epoch 3" in caplog.text
    assert f"ckpt_path={last}" in caplog.text
    assert load_checkpoint(last)["epoch"] == 2
    assert not (tmp_path / "cut" / "embedding.h5ad").exists()

    monkeypatch.undo()
    training.train(make_config(*settings, f"ckpt_path={last}", run_dir=tmp_path / "cut"))
    np.testing.assert_array_equal(embedding(tmp_path / "cut"), embedding(tmp_path / "full"))
    # one per-step log for the whole run, as the uninterrupted run's
    losses = [
        pd.read_csv(run / "csv" / "metrics.csv").dropna(subset=["train/loss"])
        for run in (tmp_path / "full", tmp_path / "cut")
    ]
    pd.testing.assert_frame_equal(
        *(f[["step", "train/loss"]].reset_index(drop=True) for f in losses)
    )


def test_resume_with_other_settings_is_refused(make_config, monkeypatch, tmp_path):
    with_callback(monkeypatch, InterruptAt(1, RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        training.train(make_config(*EPOCHS))
    monkeypatch.undo()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ScProtoInputError, match="n_prototypes: 20 there, 30 here"):
        training.train(make_config(*EPOCHS, "model.n_prototypes=30", f"ckpt_path={last}"))


def test_a_finished_model_is_not_a_training_state(make_config, tmp_path):
    training.train(make_config("trainer.max_epochs=1"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ScProtoInputError, match="holds a model but no training state"):
        training.train(make_config(f"ckpt_path={last}", run_dir=tmp_path / "other"))


class Payload:
    """Any class: unpickling it means running code from the file."""


@pytest.mark.parametrize("loader", ["api", "resume"])
def test_a_checkpoint_carrying_pickled_objects_is_refused(make_config, tmp_path, loader):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "payload": Payload()}, path)
    with pytest.raises(ScProtoInputError, match="holds pickled Python objects") as caught:
        if loader == "api":
            ScProto.load(path)
        else:
            training.train(make_config(f"ckpt_path={path}"))
    assert "weights_only" not in str(caught.value)  # no advice to turn the safety off


def wait_for_epoch(path, epoch: int, process, timeout: float = 240) -> int:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert process.poll() is None, "the run ended before it could be killed"
        if path.is_file():
            saved = torch.load(path, weights_only=True)["epoch"]  # complete: written atomically
            if saved >= epoch:
                return saved
        time.sleep(0.05)
    raise TimeoutError(path)


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_embedding(tmp_path):
    settings = [
        sys.executable,
        "train.py",
        "debug=default",
        "trainer.max_epochs=40",
        "trainer.enable_progress_bar=false",
        "query.epochs=5",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    run = lambda *more: subprocess.run(  # noqa: E731
        [*settings, *more], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run(f"hydra.run.dir={tmp_path / 'full'}").returncode == 0

    cut = tmp_path / "cut"
    process = subprocess.Popen(
        [*settings, f"hydra.run.dir={cut}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        saved = wait_for_epoch(cut / "checkpoints" / "last.ckpt", 3, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert saved < 39 and not (cut / "embedding.h5ad").exists()

    resumed = run(f"hydra.run.dir={cut}", f"ckpt_path={cut / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    difference = np.abs(embedding(cut) - embedding(tmp_path / "full")).max()
    assert difference <= 1e-5, f"killed after epoch {saved}: max difference {difference}"
