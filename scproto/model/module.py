"""The scProto LightningModule:
L = L_batchSwAV + λ_prop · L_prop + λ_cvae · L_cvae + λ_geometry · L_geometry."""

import math
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from scproto.errors import ScProtoInputError
from scproto.model.augment import gene_scale_augmentation
from scproto.model.cvae import ConditionalVAE
from scproto.model.distributed import gather_labels, gather_scores, world_size
from scproto.model.losses import batch_swav_losses, geometry_loss
from scproto.model.optim import build_optimizer, warmup_cosine
from scproto.model.prototypes import kmeans_prototypes, reseed_unused
from scproto.registry import Registry
from scproto.run.settings import check_choice, group_defaults

SETTING_GROUPS = ("model", "loss", "sinkhorn")  # the config groups whose keys are settings here

ANCHOR_ROWS_PER_PROTOTYPE = 256  # anchors kept per epoch for k-means and re-seeding


class ScProtoModule(pl.LightningModule):
    """Conditional VAE + K unit-norm prototypes, trained on minibatches of neighbour views.

    A minibatch holds V views of B anchor cells as V·B rows, view-major: row v·B + i is
    view v of anchor i (view 0 is the anchor itself). Every row goes through the encoder
    once; the SwAV and propagation terms are then computed per study group, and L_cvae on
    the rows of the first ``cvae_views`` views (all of them by default, as in the paper).

    Optional schedule around the paper's loss: ``cvae_warmup_epochs`` of the CVAE term
    alone, then (``prototype_init="kmeans"``) the prototypes start at the spherical k-means
    centroids of the anchors' μ; ``reseed_prototypes`` restarts, at each epoch's end, the
    prototypes that no anchor took as its nearest on random anchors.
    """

    def __init__(
        self,
        n_genes: int,
        n_studies: int,
        *,
        n_views: int | None = None,
        optimizer: dict[str, Any] | None = None,
        registry: "Registry | dict[str, Any] | None" = None,
        **settings: Any,
    ) -> None:
        """``settings``: the keys of the model, loss and sinkhorn config groups
        (``n_prototypes``, ``lambda_prop``, ``epsilon``, ``n_iters``, …); any not given
        takes its default from ``scproto/configs``, the one place defaults are written, as
        do ``n_views`` (data) and ``optimizer``."""
        super().__init__()
        defaults = {k: v for group in SETTING_GROUPS for k, v in group_defaults(group).items()}
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise TypeError(
                f"ScProtoModule got unknown settings {unknown}; known: {sorted(defaults)}"
            )
        settings = {**defaults, **settings}
        n_views = n_views or group_defaults("data")["n_views"]
        if settings["group_by"] not in ("anchor", "majority"):
            raise ScProtoInputError(
                f"group_by must be 'anchor' or 'majority', got {settings['group_by']!r}"
            )
        cvae_views = settings["cvae_views"]
        if cvae_views is not None and not 1 <= cvae_views <= n_views:
            raise ScProtoInputError(
                f"cvae_views={cvae_views} must be between 1 and the {n_views} views, or null (all)"
            )
        if settings["prototype_init"] not in ("random", "kmeans"):
            raise ScProtoInputError(
                f"prototype_init must be 'random' or 'kmeans', got {settings['prototype_init']!r}"
            )
        check_choice("model.assignment", settings["assignment"])
        self.save_hyperparameters(
            {
                "n_genes": n_genes,
                "n_studies": n_studies,
                "n_views": n_views,
                **settings,
                "optimizer": dict(optimizer or group_defaults("optimizer")),
            }
        )
        # what inference needs about the data (a Registry; a dict as stored)
        self.registry = Registry.from_dict(registry) if isinstance(registry, dict) else registry
        self.cvae = ConditionalVAE(
            n_genes,
            n_studies,
            latent_dim=settings["latent_dim"],
            hidden_dim=settings["hidden_dim"],
            decoder_hidden_dim=settings["decoder_hidden_dim"],
            embedding_dim=settings["embedding_dim"],
            dropout=settings["dropout"],
            likelihood=settings["likelihood"],
        )
        n_prototypes, latent_dim = settings["n_prototypes"], settings["latent_dim"]
        self.prototypes = nn.Parameter(F.normalize(torch.randn(n_prototypes, latent_dim), dim=1))
        # this epoch's anchors (μ, at most ANCHOR_ROWS_PER_PROTOTYPE · K rows) and how many
        # took each prototype as their nearest: for k-means and re-seeding at the epoch's end
        self._anchors: list[torch.Tensor] = []
        self._usage = torch.zeros(n_prototypes, dtype=torch.long)
        # SwAV's queue (queue_size > 0): each study's latest anchors' normalised μ, whose
        # scores join that study's Sinkhorn; not checkpointed (a resumed run refills it)
        self._queue: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------- representation
    def normalize_prototypes(self) -> None:
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(self.prototypes, dim=1))

    def scores(self, mu: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each representation μ to each prototype, in float32.

        Mixed precision stops here: Sinkhorn divides the scores by ε = 0.02, which would
        magnify half-precision rounding (~1e-3) fifty-fold.
        """
        with torch.autocast(device_type=mu.device.type, enabled=False):
            return F.normalize(mu.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T

    def study_groups(self, study: torch.Tensor) -> torch.Tensor:
        """Group of each anchor: its own study, or the majority study of its views."""
        views = study.view(self.hparams.n_views, -1)
        return views[0] if self.hparams.group_by == "anchor" else views.mode(dim=0).values

    @property
    def in_cvae_warmup(self) -> bool:
        """The first ``cvae_warmup_epochs`` train the CVAE alone (prototypes wait for k-means)."""
        return self.current_epoch < self.hparams.cvae_warmup_epochs

    # ---------------------------------------------------------------- loss
    def compute_losses(
        self,
        batch: dict[str, torch.Tensor],
        *,
        during_fit: bool = True,
        targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms of one minibatch (this rank's shard of it under DDP).

        SwAV and propagation see the global minibatch (every rank's anchors, gathered);
        the CVAE term is a mean over this shard's rows, which DDP's gradient averaging
        turns into the global mean. ``during_fit=False`` (query mapping, one process):
        the paper's loss on this minibatch alone, no warm-up, nothing gathered or recorded.
        ``targets``: indices of the prototypes SwAV's codes may use (query mapping: those
        the reference populates); all K by default.
        """
        hp = self.hparams
        x, study = batch["x"], batch["study"]
        n_anchors = x.shape[0] // hp.n_views
        # training views carry a simulated study effect; L_cvae reconstructs the clean x
        encoded = gene_scale_augmentation(x, hp.n_views, hp.gene_scale_sd) if self.training else x
        # L_cvae on the first cvae_views views of each anchor (view-major rows: a prefix)
        outputs = self.cvae(encoded, study, n_decoded=n_anchors * (hp.cvae_views or hp.n_views))
        local_scores = self.scores(outputs["mu"]).view(hp.n_views, -1, hp.n_prototypes)
        groups = self.study_groups(study)
        scores = gather_scores(local_scores, dim=1) if during_fit else local_scores
        all_groups = gather_labels(groups) if during_fit else groups
        uses_queue = during_fit and self.training and hp.queue_size > 0
        terms = batch_swav_losses(
            scores,
            all_groups,
            min_group_size=hp.min_group_size,
            temperature=hp.temperature,
            epsilon=hp.epsilon,
            n_iters=hp.n_iters,
            hard=hp.hard,
            rho=hp.rho,
            targets=targets,
            queue=self._queued_scores() if uses_queue else None,
        )
        if uses_queue and not self.in_cvae_warmup:
            self._enqueue(gather_scores(outputs["mu"][:n_anchors].detach(), dim=0), all_groups)
        terms |= self.cvae.loss(x, study, outputs, batch.get("counts"), kl_weight=hp.kl_weight)
        terms["geometry"] = self._geometry(outputs["mu"][:n_anchors], study[:n_anchors], batch)
        terms["loss"] = (
            terms["swav"]
            + hp.lambda_prop * terms["prop"]
            + hp.lambda_cvae * terms["cvae"]
            + hp.lambda_geometry * terms["geometry"]
        )
        if during_fit and self.in_cvae_warmup:
            terms["loss"] = hp.lambda_cvae * terms["cvae"]
        if during_fit and self.training and self._collects_anchors():
            self._record_anchors(outputs["mu"][: local_scores.shape[1]], local_scores[0])
        terms.update(self._assignment_diagnostics(scores[0]))
        return terms

    def _geometry(
        self, mu: torch.Tensor, study: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """L_geometry on this shard's anchors: their μ against their PCA coordinates."""
        if self.hparams.lambda_geometry == 0:
            return mu.new_zeros(())
        if "pca" not in batch:
            raise ScProtoInputError(
                "loss.lambda_geometry > 0 needs the cells' PCA coordinates in each minibatch "
                "(batch['pca'], which ScProtoDataModule provides when data.geometry_pcs > 0); "
                "set data.geometry_pcs (10 by default) or loss.lambda_geometry=0 "
                "to train without them."
            )
        return geometry_loss(mu, batch["pca"][: mu.shape[0]], study, self.hparams.min_group_size)

    @torch.no_grad()
    def _queued_scores(self) -> dict[int, torch.Tensor]:
        """Each study's queued μ scored against the prototypes as they are now."""
        return {study: self.scores(mu) for study, mu in self._queue.items()}

    @torch.no_grad()
    def _enqueue(self, mu: torch.Tensor, groups: torch.Tensor) -> None:
        """Keep each study's latest ``queue_size`` anchors (newest first)."""
        for study in torch.unique(groups).tolist():
            rows = F.normalize(mu[groups == study], dim=1)
            kept = self._queue.get(study, rows[:0])
            self._queue[study] = torch.cat([rows, kept])[: self.hparams.queue_size]

    def _collects_anchors(self) -> bool:
        hp = self.hparams
        if self.in_cvae_warmup:  # only the warm-up's last epoch feeds k-means
            last = self.current_epoch == hp.cvae_warmup_epochs - 1
            return last and hp.prototype_init == "kmeans"
        return hp.reseed_prototypes

    @torch.no_grad()
    def _record_anchors(self, mu: torch.Tensor, anchor_scores: torch.Tensor) -> None:
        if sum(len(a) for a in self._anchors) < ANCHOR_ROWS_PER_PROTOTYPE * len(self._usage):
            self._anchors.append(mu.detach())
        nearest = anchor_scores.argmax(dim=1).cpu()
        self._usage += torch.bincount(nearest, minlength=len(self._usage))

    @torch.no_grad()
    def _assignment_diagnostics(self, anchor_scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """SwAV collapse checks on the anchors' nearest prototypes (not on Sinkhorn's Q,
        which is balanced by construction): prototypes in use and the entropy of their
        histogram, ln K when every prototype is used equally, 0 when one takes all."""
        nearest = anchor_scores.argmax(dim=1)
        share = torch.bincount(nearest, minlength=anchor_scores.shape[1]).float() / nearest.numel()
        entropy = -(share * share.clamp_min(1e-12).log()).sum()
        in_use = (share > 0).sum().float()
        return {"prototypes_in_use": in_use, "assignment_entropy": entropy}

    # ---------------------------------------------------------------- Lightning hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.normalize_prototypes()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch)
        # Per-step values averaged over ranks (the CVAE terms differ between shards).
        log = partial(self.log, batch_size=batch["x"].shape[0], sync_dist=world_size() > 1)
        log("train/loss", terms["loss"], prog_bar=True)
        for name in ("swav", "prop", "cvae", "recon", "kl", "geometry"):
            log(f"train/loss_{name}", terms[name])
        log("train/swav_over_lnK", terms["swav"] / math.log(self.hparams.n_prototypes))
        for name in ("prototypes_in_use", "assignment_entropy", "n_groups"):
            log(f"train/{name}", terms[name])
        log("train/lr", self.optimizers().param_groups[0]["lr"])
        return terms["loss"]

    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 < max_epochs <= self.hparams.cvae_warmup_epochs:
            raise ScProtoInputError(
                f"model.cvae_warmup_epochs={self.hparams.cvae_warmup_epochs} leaves no epoch "
                f"for the prototypes within trainer.max_epochs={max_epochs}: lower it."
            )

    def on_train_epoch_end(self) -> None:
        """k-means after the warm-up; later, unused prototypes re-seeded on random anchors."""
        hp, epoch = self.hparams, self.current_epoch
        if self._anchors:
            anchors, usage = torch.cat(self._anchors), self._usage
            seed = int(torch.randint(2**31 - 1, (1,)))  # from the seeded, checkpointed stream
            if epoch == hp.cvae_warmup_epochs - 1:
                self._set_prototypes(lambda: kmeans_prototypes(anchors, hp.n_prototypes, seed=seed))
            elif not self.trainer.max_epochs or epoch < self.trainer.max_epochs - 1:
                usage = self.trainer.strategy.reduce(usage.to(self.device), reduce_op="sum").cpu()
                self.log("train/prototypes_reseeded", (usage == 0).sum().float())
                self._set_prototypes(
                    lambda: reseed_unused(self.prototypes.detach().cpu(), usage, anchors, seed)
                )
        self._anchors.clear()
        self._usage.zero_()

    def _set_prototypes(self, compute) -> None:
        """Rank 0 computes new prototypes from its anchors; every rank takes them."""
        new = compute() if self.trainer.is_global_zero else None
        new = self.trainer.strategy.broadcast(new, src=0)
        with torch.no_grad():
            self.prototypes.copy_(new.to(self.prototypes.device))

    def on_after_backward(self) -> None:
        # SwAV's optional freeze: prototypes stay put while the encoder organises itself.
        if self.global_step < self.hparams.freeze_prototypes_iters:
            self.prototypes.grad = None

    def on_train_end(self) -> None:
        self.cvae.settle_study_embedding()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scproto_registry"] = self.registry.to_dict() if self.registry else {}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("scproto_registry")
        self.registry = Registry.from_dict(stored) if stored else None

    def configure_optimizers(self):
        settings = dict(self.hparams.optimizer)
        warmup_epochs = settings.pop("warmup_epochs", 0)
        final_lr_ratio = settings.pop("final_lr_ratio", 0.0)
        schedule = settings.pop("schedule", "warmup_cosine")
        optimizer = build_optimizer(self.parameters(), **settings)
        if schedule == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        if not math.isfinite(self.trainer.num_training_batches):
            # trainer.max_steps without max_epochs: Lightning has not sized the epoch yet
            self.trainer.fit_loop.setup_data()
        steps_per_epoch = max(1, int(self.trainer.num_training_batches))
        warmup_steps = min(total_steps, warmup_epochs * steps_per_epoch)

        def multiplier(step: int) -> float:
            return warmup_cosine(
                step, warmup_steps=warmup_steps, total_steps=total_steps, final_ratio=final_lr_ratio
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
