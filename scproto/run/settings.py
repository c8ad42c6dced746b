"""Every setting checked before any data is read: its values, its range, its name.

A mistake in a setting ends the run in one message that lists each bad setting with what it
may be, and the closest known name for a mistyped one (`loss.lambda_porp` → `loss.lambda_prop`).
"""

import difflib
import inspect
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from scproto.errors import ScProtoInputError
from scproto.model.optim import LARS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped in the package


def group_defaults(group: str) -> dict:
    """The settings of ``group``'s default option in ``train.yaml`` (``data``: the keys of
    ``data/h5ad.yaml`` every data option shares): the one place defaults are written,
    read by the LightningModule for every setting it is not given. A fresh dict each call."""
    return OmegaConf.to_container(_group_config(group))


@cache
def _group_config(group: str) -> DictConfig:
    if group == "data":
        option = "h5ad"
    else:
        defaults = OmegaConf.load(CONFIG_DIR / "train.yaml").defaults
        option = next(d[group] for d in defaults if isinstance(d, DictConfig) and group in d)
    return OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")


# Settings with a fixed set of values.
CHOICES = {
    "model.likelihood": ("mse", "nb"),
    "model.prototype_init": ("random", "kmeans"),
    "model.assignment": ("point", "cosine"),
    "data.neighbor_weighting": ("uniform", "distance"),
    "data.pca_scaling": ("study", "all", "none"),
    "data.hvg_flavor": ("seurat", "seurat_v3", "cell_ranger"),
    "loss.group_by": ("anchor", "majority"),
    "query.objective": ("scproto", "cvae"),
    "query.targets": ("populated", "all"),
    "optimizer.name": ("lars", "adam"),
    "optimizer.schedule": ("warmup_cosine", "constant"),
    "data.source": ("synthetic", "h5ad"),
    "data.knn_index": ("auto", "exact", "ivf_flat", "ivf_pq"),
}


@dataclass(frozen=True)
class Bound:
    """A number in [low, high], either end open or absent; ``integer`` for counts."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # null allowed

    def admits(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        parts = []
        if self.low > -math.inf:
            parts.append(f"{'>' if self.low_open else '≥'} {self.low:g}")
        if self.high < math.inf:
            parts.append(f"{'<' if self.high_open else '≤'} {self.high:g}")
        return f"{kind} {' and '.join(parts)}" + (", or null" if self.optional else "")


def count(low: int = 0, optional: bool = False) -> Bound:
    return Bound(low=low, integer=True, optional=optional)


POSITIVE = Bound(low=0, low_open=True)
NON_NEGATIVE = Bound(low=0)
SHARE = Bound(low=0, high=1)

RANGES = {
    "seed": count(0),
    "data.n_top_genes": count(1),
    "data.min_genes": count(1),
    "data.target_sum": POSITIVE,
    "data.n_pcs": count(1),
    "data.geometry_pcs": count(0),
    "data.geometry_smoothing": count(0),
    "data.n_neighbors": count(1),
    "data.mnn_neighbors": count(0),
    "data.mnn_slots": count(1),
    "data.knn_approximate_above": count(1, optional=True),
    "data.pca_max_cells": count(2, optional=True),
    "data.hvg_max_cells": count(2, optional=True),
    "data.knn_nprobe": count(1),
    "data.knn_min_recall": SHARE,
    "data.n_views": count(2),
    "data.batch_size": count(1),
    "data.min_cells_per_study": count(1),
    "data.num_workers": count(0),
    "model.n_prototypes": count(2),
    "model.latent_dim": count(1),
    "model.hidden_dim": count(1, optional=True),
    "model.decoder_hidden_dim": count(1, optional=True),
    "model.embedding_dim": count(1),
    "model.dropout": Bound(low=0, high=1, high_open=True),
    "model.freeze_prototypes_iters": count(0),
    "model.cvae_warmup_epochs": count(0),
    "loss.lambda_cvae": NON_NEGATIVE,
    "loss.lambda_prop": NON_NEGATIVE,
    "loss.lambda_geometry": NON_NEGATIVE,
    "loss.gene_scale_sd": NON_NEGATIVE,
    "loss.kl_weight": NON_NEGATIVE,
    "loss.cvae_views": count(1, optional=True),
    "loss.temperature": POSITIVE,
    "loss.min_group_size": count(1),
    "sinkhorn.epsilon": POSITIVE,
    "sinkhorn.n_iters": count(1),
    "sinkhorn.rho": Bound(low=0, low_open=True, optional=True),
    "sinkhorn.queue_size": count(0),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.momentum": Bound(low=0, high=1, high_open=True),
    "optimizer.trust_coefficient": POSITIVE,
    "optimizer.warmup_epochs": count(0),
    "optimizer.final_lr_ratio": SHARE,
    "trainer.max_epochs": count(1),
    "query.epochs": count(0),
    "query.lr": POSITIVE,
    "query.batch_size": count(1),
    "query.mnn_neighbors": count(0),
    "label_transfer.uncertainty_threshold": SHARE,
    "eval.subsample": count(1, optional=True),
    "eval.scib.max_cells": count(1, optional=True),
    "eval.pca_components": count(1),
}
FLAGS = (
    "overwrite",
    "sinkhorn.hard",
    "model.reseed_prototypes",
    "data.backed",
    "query.study_shift",
)

# Groups whose keys are free: instantiated targets, Hydra's own, file locations, and the
# marker tasks (each key is a task the user names).
OPEN = ("hydra", "logger", "callbacks", "paths", "eval.markers.tasks", "data.synthetic")
SCHEDULE_KEYS = ("name", "lr", "schedule", "warmup_epochs", "final_lr_ratio")


def validate_config(cfg: DictConfig) -> None:
    """Raise one :class:`ScProtoInputError` naming every bad setting of ``cfg``."""
    problems = [*unknown_keys(cfg), *bad_values(cfg)]
    target = cfg.get("optimized_metric")
    if target and not str(target).startswith("train/") and not cfg.eval.enabled:
        problems.append(
            f"optimized_metric={target} comes from the evaluation, which eval=none turns off; "
            "use eval=fast or eval=full, or a train/ metric."
        )
    cvae_views, n_views = (
        OmegaConf.select(cfg, "loss.cvae_views"),
        OmegaConf.select(cfg, "data.n_views"),
    )
    if isinstance(cvae_views, int) and isinstance(n_views, int) and cvae_views > n_views:
        problems.append(
            f"`loss.cvae_views={cvae_views}` exceeds `data.n_views={n_views}`: L_cvae can "
            "reconstruct at most every view."
        )
    if OmegaConf.select(cfg, "data.backed") and OmegaConf.select(cfg, "data.source") != "h5ad":
        problems.append(
            "`data.backed=true` reads an .h5ad file in blocks; the synthetic data is generated "
            "in memory. Use data=h5ad data.path=<file>, or data.backed=false."
        )
    resume = cfg.get("ckpt_path")
    if resume and not Path(resume).is_file():
        problems.append(f"ckpt_path={resume}: no such checkpoint file ({Path(resume).resolve()}).")
    if len(problems) == 1:
        raise ScProtoInputError(problems[0])
    if problems:
        raise ScProtoInputError("settings to fix:\n  - " + "\n  - ".join(problems))


def bad_values(cfg: DictConfig) -> list[str]:
    problems = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"`{key}={value}` is not valid; choose one of {', '.join(allowed)}.")
    absent = object()
    for key, bound in RANGES.items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent:
            continue  # e.g. optimizer.momentum under adam
        if not bound.admits(value):
            problems.append(f"`{key}={value}` is not valid; it must be {bound.describe()}.")
    for key in FLAGS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            problems.append(f"`{key}={value}` is not valid; it must be true or false.")
    return problems


def unknown_keys(cfg: DictConfig) -> list[str]:
    # the optimiser's keys depend on optimizer.name: Adam takes no momentum
    known = {k for k in known_settings() if not k.startswith("optimizer.")}
    known |= {*optimizer_keys(cfg), *trainer_keys()}
    problems = []
    for key in flat_keys(cfg):
        if key in known or key.startswith(tuple(f"{o}." for o in OPEN)) or key in OPEN:
            continue
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        candidates = sorted(k for k in known if k.startswith(section) or not section)
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else "see `python train.py --cfg job`."
        problems.append(f"`{key}` is not a setting; {hint}")
    return problems


def flat_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf (and of every open group) under ``node``."""
    keys = []
    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and name not in OPEN and not name.startswith("trainer."):
            keys.extend(flat_keys(value, f"{name}."))
        else:
            keys.append(name)
    return keys


@cache
def known_settings() -> frozenset[str]:
    """Every key any choice of any config group defines, plus the root config's own."""
    known = set()
    root = OmegaConf.load(CONFIG_DIR / "train.yaml")
    known |= {k for k in root if k != "defaults"}
    for group in CONFIG_DIR.iterdir():
        if not group.is_dir():
            continue
        known.add(group.name)
        for path in group.glob("*.yaml"):
            if path.read_text().lstrip().startswith("# @package _global_"):
                continue  # overlays (experiment, debug, ...) set keys defined elsewhere
            node = OmegaConf.load(path)
            known |= {f"{group.name}.{k}" for k in flat_keys(node) if k != "defaults"}
    return frozenset(known)


def optimizer_keys(cfg: DictConfig) -> list[str]:
    """The schedule's keys and the chosen optimiser's own keyword arguments."""
    optimizer = {"lars": LARS, "adam": torch.optim.Adam}.get(
        OmegaConf.select(cfg, "optimizer.name")
    )
    arguments = inspect.signature(optimizer).parameters if optimizer else {}
    names = [*SCHEDULE_KEYS, *(a for a in arguments if a not in ("self", "params"))]
    return [f"optimizer.{name}" for name in names]


@cache
def trainer_keys() -> frozenset[str]:
    arguments = inspect.signature(pl.Trainer.__init__).parameters
    return frozenset({"trainer._target_", *(f"trainer.{a}" for a in arguments if a != "self")})


def check_choice(key: str, value: str) -> None:
    """The Python API's counterpart of the settings check for a key of ``CHOICES``."""
    allowed = CHOICES[key]
    if value not in allowed:
        raise ScProtoInputError(f"{key} must be one of {list(allowed)}, got {value!r}")


def check_argument(name: str, value, bound: Bound) -> None:
    """The Python API's counterpart of the settings check, for one keyword argument."""
    if not bound.admits(value):
        raise ScProtoInputError(f"{name}={value!r} is not valid; it must be {bound.describe()}.")
