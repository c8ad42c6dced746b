"""W&B offline: every loss term in the run's history, the config and version logged, and
the run closed also when training crashes (so the next job of a sweep starts clean)."""

import struct
import time
from pathlib import Path

import pytest
import wandb
from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

import scproto
from scproto.model.module import ScProtoModule
from scproto.train import train

LOSS_KEYS = {f"train/loss_{t}" for t in ("swav", "prop", "cvae", "recon", "kl")} | {
    "train/loss",
    "train/lr",
    "train/prototypes_in_use",
    "train/assignment_entropy",
    "train/swav_over_lnK",
}


def offline_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """The records of the one offline run under ``run_dir/wandb``: the .wandb file is a
    LevelDB-style log (7-byte header, then 32 KiB blocks of checksum, length, type, data)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if pos + 7 + length > len(raw):  # W&B's service is still writing this record
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError:  # a tail caught mid-write; closed_run_records reads again
                break
            records.append(record)
            pending = b""
    return records


def exits_of(records) -> list:
    return [r.exit for r in records if r.WhichOneof("record_type") == "exit"]


def closed_run_records(run_dir: Path, timeout: float = 60) -> list[wandb_internal_pb2.Record]:
    """The records once the run's exit record is in the file: W&B's service process writes
    the .wandb file and may still be writing its tail when ``wandb.finish`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = offline_records(run_dir)
        if exits_of(records):
            return records
        if time.monotonic() > deadline:
            return records  # the assertions below say what is missing
        time.sleep(0.5)


def keys_of(records, kind: str) -> set[str]:
    items = {
        "history": lambda r: r.history.item,
        "config": lambda r: r.config.update,
        "summary": lambda r: r.summary.update,
    }[kind]
    found = set()
    for record in records:
        if record.WhichOneof("record_type") == kind:
            found |= {item.key or "/".join(item.nested_key) for item in items(record)}
    return found


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_offline_run_logs_every_loss_term_config_and_results(make_config, tmp_path):
    # evaluation without scIB (a minute of JAX compiling): tables and figures still come
    run = make_config(
        "logger=wandb", "trainer.log_every_n_steps=1", "eval=full", "eval.scib.enabled=false"
    )
    train(run)
    assert wandb.run is None  # closed
    records = closed_run_records(tmp_path / "run")
    history = keys_of(records, "history")
    assert LOSS_KEYS <= history
    media = {k.rsplit("/", 1)[0] for k in history if k.endswith("/_type")}  # tables, images
    written = sorted(p.name for p in (tmp_path / "run").rglob("*") if p.suffix in {".csv", ".png"})
    assert {"eval/coverage", "eval/scgraph", "figures/umap_prototypes"} <= media, (
        f"media logged: {sorted(media)}; result files: {written}"
    )
    assert {"config", "scproto_version"} <= keys_of(records, "config")
    assert {"metacells/fidelity_median", "scgraph/corr_weighted"} <= keys_of(records, "summary")
    exits = exits_of(records)
    assert len(exits) == 1 and exits[0].exit_code == 0
    version = next(
        item.value_json
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
        if item.key == "scproto_version"
    )
    assert scproto.__version__ in version
    assert (tmp_path / "run/csv/metrics.csv").is_file()  # CSV beside W&B


def test_a_crashed_run_is_closed_with_a_failure_code(make_config, tmp_path, monkeypatch):
    def crash(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(ScProtoModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="boom"):
        train(make_config("logger=wandb"))
    assert wandb.run is None
    exits = exits_of(closed_run_records(tmp_path / "run"))
    assert len(exits) == 1 and exits[0].exit_code == 1
