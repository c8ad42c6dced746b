"""scPoli-style conditional VAE with a prototype layer in its latent space."""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scproto.errors import ScProtoInputError
from scproto.model.losses import kl_divergence, mse_reconstruction, negative_binomial_nll

Likelihood = Literal["mse", "nb"]


class ConditionedBlock(nn.Module):
    """Linear([x ‖ e]) (+ b_s) → LayerNorm (no affine, as in scPoli) → ReLU → Dropout.

    The linear map is computed as W_x·x + W_e·e: the same function as on the
    concatenation, but without copying x, and autograd never forms the gradient with
    respect to x (a full rows × genes product) just to reach the embedding e.

    ``study_shift`` (absent until query mapping adds it) holds a free pre-activation shift
    b_s per study, zero for the studies the model was trained on: what scArches' surgery
    trains for a new one-hot study column. Through W_e alone a new study reaches only a
    ``n_condition``-dimensional subspace of the layer's ``n_out`` units.
    """

    def __init__(self, n_in: int, n_condition: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.data = nn.Linear(n_in, n_out)
        self.condition = nn.Linear(n_condition, n_out, bias=False)
        self.post = nn.Sequential(
            nn.LayerNorm(n_out, elementwise_affine=False), nn.ReLU(), nn.Dropout(dropout)
        )
        self.study_shift: nn.Embedding | None = None

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor, study: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``study``: each row's study code, for the shift (−1, or None: no shift)."""
        pre = self.data(x) + self.condition(condition)
        if self.study_shift is not None and study is not None:
            pre = pre + self.study_shift(study.clamp_min(0)) * (study >= 0)[:, None]
        return self.post(pre)


class ConditionalVAE(nn.Module):
    """Encoder q(z | x, e_s) and decoder p(x | z, e_s), e_s the embedding of study s.

    The representation of a cell is the posterior mean μ; the sample z is used only by
    the reconstruction term.
    """

    def __init__(
        self,
        n_genes: int,
        n_studies: int,
        *,
        latent_dim: int,
        hidden_dim: int | None,
        embedding_dim: int,
        decoder_hidden_dim: int | None = None,
        dropout: float,
        likelihood: Likelihood,
    ) -> None:
        """The settings come from the LightningModule (defaults: ``configs/model``);
        ``hidden_dim`` None is ceil(√n_genes); ``decoder_hidden_dim`` None is
        ``hidden_dim``."""
        super().__init__()
        if likelihood not in ("mse", "nb"):
            raise ScProtoInputError(f"model.likelihood must be 'mse' or 'nb', got {likelihood!r}")
        hidden_dim = hidden_dim or math.ceil(math.sqrt(n_genes))
        decoder_hidden_dim = decoder_hidden_dim or hidden_dim
        self.likelihood = likelihood
        self.study_embedding = nn.Embedding(n_studies, embedding_dim, max_norm=1.0)
        self.encoder = ConditionedBlock(n_genes, embedding_dim, hidden_dim, dropout)
        self.mean_head = nn.Linear(hidden_dim, latent_dim)
        self.logvar_head = nn.Linear(hidden_dim, latent_dim)
        self.decoder = ConditionedBlock(latent_dim, embedding_dim, decoder_hidden_dim, dropout)
        self.output_head = nn.Linear(decoder_hidden_dim, n_genes)
        if likelihood == "nb":
            # log inverse dispersion per study × gene
            self.log_theta = nn.Parameter(torch.zeros(n_studies, n_genes))

    @property
    def latent_dim(self) -> int:
        return self.mean_head.out_features

    @torch.no_grad()
    def settle_study_embedding(self) -> None:
        """Apply the embedding's max_norm to every row now.

        ``Embedding(max_norm=1)`` rescales a row in place whenever it is looked up, so the
        first lookup after an optimiser step changes the stored weights. Settling them once
        after training makes every later lookup leave the parameters bit-identical.
        """
        self.study_embedding(
            torch.arange(self.study_embedding.num_embeddings, device=self.output_head.weight.device)
        )

    def mean_study_embedding(self, n_studies: int | None = None) -> torch.Tensor:
        """Average of the first ``n_studies`` study embeddings (all by default): the
        condition of a batch-free profile."""
        n_studies = n_studies or self.study_embedding.num_embeddings
        studies = torch.arange(n_studies, device=self.output_head.weight.device)
        return self.study_embedding(studies).mean(dim=0)

    def condition(self, study: torch.Tensor) -> torch.Tensor:
        """Study embedding of each row; code −1 (a study the model has not seen) gets the mean."""
        unseen = study < 0
        if not unseen.any():
            return self.study_embedding(study)
        embedding = self.study_embedding(study.clamp_min(0))
        return torch.where(unseen[:, None], self.mean_study_embedding(), embedding)

    @property
    def has_study_shifts(self) -> bool:
        return self.encoder.study_shift is not None

    def add_study_shifts(self) -> None:
        """Give both conditioned layers a pre-activation shift per study, all zero (the
        model's function is unchanged until query mapping trains the new studies' rows)."""
        n_studies = self.study_embedding.num_embeddings
        device = self.output_head.weight.device
        for block in (self.encoder, self.decoder):
            old = block.study_shift
            shift = nn.Embedding(n_studies, block.condition.out_features, device=device)
            with torch.no_grad():
                shift.weight.zero_()
                if old is not None:
                    shift.weight[: old.num_embeddings] = old.weight
            block.study_shift = shift

    def encode(self, x: torch.Tensor, study: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(x, self.condition(study), study)
        return self.mean_head(hidden), self.logvar_head(hidden)

    def decode(
        self, z: torch.Tensor, embedding: torch.Tensor, study: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Expression (MSE) or gene proportions (NB) for latents z and study embeddings
        (``study``: the rows' study codes, for the study shifts; None for a profile
        decoded at an embedding of no study, such as a metacell's)."""
        out = self.output_head(self.decoder(z, embedding, study))
        return F.relu(out) if self.likelihood == "mse" else F.softmax(out, dim=-1)

    def forward(
        self, x: torch.Tensor, study: torch.Tensor, n_decoded: int | None = None
    ) -> dict[str, torch.Tensor]:
        """μ and log σ² of every row; ``decoded`` for the first ``n_decoded`` rows (all by
        default), the only rows :meth:`loss` then scores."""
        mu, logvar = self.encode(x, study)
        rows = slice(0, n_decoded)
        mu_d, logvar_d = mu[rows], logvar[rows]
        z = mu_d + torch.randn_like(mu_d) * torch.exp(0.5 * logvar_d) if self.training else mu_d
        decoded = self.decode(z, self.condition(study[rows]), study[rows])
        return {"mu": mu, "logvar": logvar, "decoded": decoded}

    def loss(
        self,
        x: torch.Tensor,
        study: torch.Tensor,
        outputs: dict[str, torch.Tensor],
        counts: torch.Tensor | None = None,
        kl_weight: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """L_cvae = recon + kl_weight · KL ("cvae"), with its reconstruction (summed over
        genes) and KL terms, each averaged over the decoded rows: the one definition that
        training and query surgery share."""
        n = outputs["decoded"].shape[0]
        x, study = x[:n], study[:n]
        counts = None if counts is None else counts[:n]
        if self.likelihood == "mse":
            reconstruction = mse_reconstruction(x, outputs["decoded"])
        else:
            library = counts.sum(dim=-1, keepdim=True)
            theta = self.log_theta[study].exp()
            nll = negative_binomial_nll(counts, outputs["decoded"] * library, theta)
            reconstruction = nll.mean()
        kl = kl_divergence(outputs["mu"][:n], outputs["logvar"][:n]).mean()
        return {"recon": reconstruction, "kl": kl, "cvae": reconstruction + kl_weight * kl}
