"""The run directory: what a run writes, how it is written, and what may replace it.

Three rules keep a run from ever being lost:

* every output is written to a temporary file in its folder and renamed into place
  (:func:`atomic_path`), so a file that exists is complete;
* a directory that holds a run's outputs is refused unless ``overwrite=true``, and then the
  new run writes into ``RUN/.overwrite/`` and replaces the old outputs only once it has
  finished (:class:`RunDirectory`), so a failing run leaves the old one whole;
* writability is checked before any data is read.
"""

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from scproto.errors import ScProtoInputError

# Every file name of a run directory: the entry points, the evaluation and the trackers
# read them from here.
CHECKPOINT = "checkpoints/last.ckpt"
MAPPED_CHECKPOINT = "checkpoints/mapped.ckpt"
EMBEDDING = "embedding.h5ad"
METACELLS = "metacells.h5ad"
PROTOTYPES = "prototypes.npy"
METRICS = "metrics.json"
REPORT = "report.md"
FIGURES = "figures"
HISTORY = "csv/metrics.csv"  # the CSV logger's per-step losses
RESULT_TABLES = ("scib", "scgraph", "coverage", "markers")  # <name>.csv of the evaluation
STAGING = ".overwrite"  # where an overwriting run writes until it has finished
REPLACED = ".replaced"  # the old outputs, for the moment of the swap

# The model outputs of `python train.py`, and the evaluation's.
MODEL_OUTPUTS = (CHECKPOINT, EMBEDDING, PROTOTYPES, METACELLS)
EVALUATION_OUTPUTS = (METRICS, REPORT, *(f"{name}.csv" for name in RESULT_TABLES))
TRAIN_OUTPUTS = (*MODEL_OUTPUTS, *EVALUATION_OUTPUTS, FIGURES)
# The generated input of a data.source=synthetic run, written before training: not an
# output a new run is refused for (it is the same for the same settings, and a resumed
# run or a second DDP rank finds it there).
SYNTHETIC_DATA = "data.h5ad"
# Files only a training run writes: a directory holding one is a training run's.
TRAINING_MARKERS = (CHECKPOINT, PROTOTYPES, METACELLS)
MAP_QUERY_OUTPUTS = (EMBEDDING, MAPPED_CHECKPOINT)
# What Hydra and the loggers write beside the outputs; replaced together with them.
RECORDS = (".hydra", "train.log", "map_query.log", "csv", "wandb")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` on success.

    The temporary name keeps the suffix (``np.save`` and ``savefig`` go by it) and starts
    with a dot, so a half-written file never carries an output's name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named, not created (mkstemp would make it private, 0600): the writer creates it.
    temporary = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_writable(directory: Path) -> None:
    """Fail now, not after training, when ``directory`` (or what would hold it) is read-only."""
    for folder in (directory, directory / "checkpoints"):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise ScProtoInputError(
                f"{existing} is a file, so the run directory {directory} cannot be made there. "
                "Choose another hydra.run.dir."
            )
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as error:
            raise ScProtoInputError(
                f"{existing} is not writable ({error.strerror}), so this run could not save its "
                f"outputs in {directory}. Choose another hydra.run.dir, or make it writable."
            ) from error


def existing_outputs(directory: Path, names: Sequence[str], resume: Path | None = None) -> list:
    """The outputs among ``names`` present in ``directory``; the checkpoint a run resumes
    from does not count (resuming in the run's own directory is the point)."""
    found = [name for name in names if (directory / name).exists()]
    if resume is not None:
        found = [n for n in found if (directory / n).resolve() != Path(resume).resolve()]
    return found


def refuse_training_run(directory: Path) -> None:
    """``map_query`` never writes into a training run's directory, overwrite or not."""
    if any((directory / name).exists() for name in TRAINING_MARKERS):
        raise ScProtoInputError(
            f"{directory} holds a training run; map_query writes into a directory of its own "
            "and leaves that run untouched. Leave hydra.run.dir unset (a new directory under "
            "outputs/map_query/) or choose an empty one."
        )


class RunDirectory:
    """Where a run writes (``write_dir``) and where its outputs end up (``final_dir``).

    They differ when the run replaces an earlier one: it then writes into
    ``final_dir/.overwrite`` and :meth:`commit` moves its files into ``final_dir``.
    Under Hydra the redirection happens before Hydra writes its ``.hydra/`` record
    (:class:`scproto.run.hydra.GuardRunDirectory`), so ``write_dir`` arrives already
    pointing into ``.overwrite``.
    """

    def __init__(self, write_dir: Path, final_dir: Path, outputs: Sequence[str] = ()) -> None:
        self.write_dir, self.final_dir = write_dir, final_dir
        self.outputs = tuple(outputs)

    @property
    def staged(self) -> bool:
        return self.write_dir != self.final_dir

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        outputs: Sequence[str],
        overwrite: bool,
        resume: str | Path | None = None,
    ) -> "RunDirectory":
        """Check ``directory`` and choose where to write; raises before anything is changed."""
        directory = Path(directory)
        resume = Path(resume) if resume else None
        check_writable(directory)
        if directory.name == STAGING:  # Hydra was already pointed here
            return cls(directory, directory.parent, outputs)
        found = existing_outputs(directory, outputs, resume)
        if found and not overwrite:
            raise ScProtoInputError(refusal(directory, found))
        if not found:
            directory.mkdir(parents=True, exist_ok=True)
            return cls(directory, directory, outputs)
        staging = fresh_staging(directory, resume)
        return cls(staging, directory, outputs)

    def commit(self) -> None:
        """Put the finished run's files in place of the old run's (a few renames)."""
        if not self.staged:
            return
        replaced = self.final_dir / REPLACED
        shutil.rmtree(replaced, ignore_errors=True)
        replaced.mkdir()
        new = [p.name for p in self.write_dir.iterdir()]
        old = {n.split("/")[0] for n in (*self.outputs, *RECORDS, *new)}
        old |= {p.name for p in self.final_dir.glob("*.log")}
        for name in sorted(old):
            if (self.final_dir / name).exists() and name not in (STAGING, REPLACED):
                os.replace(self.final_dir / name, replaced / name)
        for name in new:
            os.replace(self.write_dir / name, self.final_dir / name)
        self.write_dir.rmdir()
        shutil.rmtree(replaced)


def fresh_staging(directory: Path, resume: Path | None) -> Path:
    """``directory/.overwrite``, emptied of an earlier failed attempt."""
    staging = directory / STAGING
    if resume is not None and staging.resolve() in Path(resume).resolve().parents:
        raise ScProtoInputError(
            f"ckpt_path={resume} lies in {staging}, which an overwriting run clears first. To "
            f"resume that interrupted run, pass hydra.run.dir={staging} instead."
        )
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def refusal(directory: Path, found: Sequence[str]) -> str:
    return (
        f"{directory} already holds the outputs of a run ({', '.join(found)}). Choose another "
        "hydra.run.dir, or pass overwrite=true to replace them once the new run has finished "
        "(the old outputs stay untouched if it fails)."
    )
