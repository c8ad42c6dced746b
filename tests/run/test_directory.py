"""The run directory: atomic writes, refusal, and an overwrite that cannot destroy."""

import os
import stat

import pytest

from scproto.errors import ScProtoInputError
from scproto.run.directory import STAGING, RunDirectory, atomic_path, check_writable

OUTPUTS = ("embedding.h5ad", "checkpoints/last.ckpt", "report.md")


def test_atomic_path_renames_on_success_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.suffix == ".csv"
        assert temporary.name.startswith(".")
        temporary.write_text("done")
    assert target.read_text() == "done"
    assert os.listdir(target.parent) == ["table.csv"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_path_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    target = tmp_path / "embedding.h5ad"
    target.write_text("the old run's")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "the old run's"
    assert os.listdir(tmp_path) == ["embedding.h5ad"]


def fill(directory, text):
    for name in OUTPUTS:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def test_refuses_outputs_without_overwrite(tmp_path):
    fill(tmp_path, "old")
    with pytest.raises(ScProtoInputError, match=r"already holds the outputs.*overwrite=true"):
        RunDirectory.open(tmp_path, outputs=OUTPUTS, overwrite=False)


def test_the_resumed_checkpoint_does_not_count_as_an_output(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/last.ckpt").write_text("epoch 4")
    directory = RunDirectory.open(
        tmp_path, outputs=OUTPUTS, overwrite=False, resume=tmp_path / "checkpoints/last.ckpt"
    )
    assert not directory.staged and directory.write_dir == tmp_path


def test_overwrite_stages_and_commits_only_at_the_end(tmp_path):
    fill(tmp_path, "old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    directory = RunDirectory.open(tmp_path, outputs=OUTPUTS, overwrite=True)
    assert directory.staged and directory.write_dir == tmp_path / STAGING
    (directory.write_dir / "checkpoints").mkdir()
    for name in OUTPUTS[:2]:  # the new run writes no report.md
        (directory.write_dir / name).write_text("new")
    assert (tmp_path / "embedding.h5ad").read_text() == "old"  # untouched until commit
    directory.commit()
    assert (tmp_path / "embedding.h5ad").read_text() == "new"
    assert (tmp_path / "checkpoints/last.ckpt").read_text() == "new"
    assert not (tmp_path / "report.md").exists()  # nothing of the old run beside the new
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints",
        "embedding.h5ad",
        "notes.txt",
    ]


def test_a_second_overwrite_attempt_starts_from_an_empty_staging_dir(tmp_path):
    fill(tmp_path, "old")
    first = RunDirectory.open(tmp_path, outputs=OUTPUTS, overwrite=True)
    (first.write_dir / "leftover.log").write_text("failed attempt")
    second = RunDirectory.open(tmp_path, outputs=OUTPUTS, overwrite=True)
    assert list(second.write_dir.iterdir()) == []


def test_a_path_through_a_file_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder goes")
    with pytest.raises(ScProtoInputError, match="is a file"):
        check_writable(tmp_path / "run")


def test_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # root ignores chmod
    with pytest.raises(ScProtoInputError, match="is not writable \\(Permission denied\\)"):
        check_writable(tmp_path / "run")


def test_train_checks_the_run_directory_before_reading_any_data(make_config, monkeypatch):
    import tempfile

    import scproto.train as training

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the run directory was checked")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(training, "load_data", never)
    with pytest.raises(ScProtoInputError, match="is not writable"):
        training.train(make_config())
