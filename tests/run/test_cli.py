"""From the command line: a mistake ends in one message, exit code 2 and a line in the
log; nothing of an existing run changes when a new one fails or map_query points at it."""

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_train_cli


def cli(*arguments: str, module: str | None = None) -> subprocess.CompletedProcess:
    entry = ["-m", module] if module else ["train.py"]
    return subprocess.run(
        [sys.executable, *entry, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def checksums(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A training run made by the command line: outputs, .hydra/ record and train.log."""
    run = tmp_path_factory.mktemp("cli") / "run"
    run_train_cli(
        "debug=default",
        "query.epochs=2",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={run.parent / 'cache'}",
        f"hydra.run.dir={run}",
    )
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.parametrize("overwrite", ["overwrite=false", "overwrite=true"])
def test_map_query_into_a_training_run_changes_nothing(run_copy, small_adata, tmp_path, overwrite):
    data = tmp_path / "query.h5ad"
    small_adata.write_h5ad(data)
    before = checksums(run_copy)
    done = cli(
        f"ckpt={run_copy / 'checkpoints' / 'last.ckpt'}",
        f"data.path={data}",
        f"hydra.run.dir={run_copy}",
        overwrite,
        module="scproto.map_query",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "holds a training run" in done.stderr and "Traceback" not in done.stderr
    assert checksums(run_copy) == before


def test_a_failing_overwrite_leaves_the_old_run_whole(run_copy, small_adata, tmp_path):
    bad = small_adata.copy()
    bad.X = bad.X.copy()
    bad.X.data[:2] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    before = checksums(run_copy)
    done = cli(
        "debug=default",
        "data=h5ad",
        f"data.path={tmp_path / 'nan.h5ad'}",
        "data.query_studies=[study_3]",
        f"hydra.run.dir={run_copy}",
        "overwrite=true",
    )
    assert done.returncode == 2
    assert "X holds 2 non-finite values" in done.stderr and "Traceback" not in done.stderr
    assert "still holds the previous run, unchanged" in done.stdout + done.stderr
    after = checksums(run_copy)
    assert {k: v for k, v in after.items() if not k.startswith(".overwrite/")} == before
    assert "X holds 2 non-finite values" in (run_copy / ".overwrite" / "train.log").read_text()


def test_an_overwrite_that_finishes_replaces_the_run(run_copy):
    old = checksums(run_copy)
    run_train_cli(
        "debug=default",
        "seed=7",
        "query.epochs=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_copy}",
        "overwrite=true",
    )
    new = checksums(run_copy)
    assert not (run_copy / ".overwrite").exists() and not (run_copy / ".replaced").exists()
    assert set(new) == set(old)
    assert new["embedding.h5ad"] != old["embedding.h5ad"]
    assert "seed=7" in (run_copy / ".hydra" / "overrides.yaml").read_text()
    assert "outputs in" in (run_copy / "train.log").read_text()


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("sinkhorn.epsilon=0", "`sinkhorn.epsilon=0` is not valid; it must be a number > 0"),
        ("+loss.lambda_porp=1", "did you mean `loss.lambda_prop`?"),
    ],
)
def test_a_bad_setting_exits_2_with_one_message_also_in_train_log(tmp_path, override, words):
    run = tmp_path / "run"
    done = cli("debug=default", override, f"hydra.run.dir={run}")
    assert done.returncode == 2
    assert "scproto: error: " in done.stderr and words in done.stderr
    assert "Traceback" not in done.stderr
    assert words in (run / "train.log").read_text()
    assert not (run / "checkpoints").exists()  # refused before anything was computed
