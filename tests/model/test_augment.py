import torch

from scproto.model.augment import gene_scale_augmentation
from tests.model.test_module import N_ANCHORS, N_GENES, N_VIEWS, make_batch, make_module


def log_expression(seed=0):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(N_VIEWS * N_ANCHORS, N_GENES, generator=generator) * 3)
    return torch.log1p(counts)


def test_zero_sd_is_the_identity():
    x = log_expression()
    assert gene_scale_augmentation(x, N_VIEWS, 0.0) is x


def test_each_view_is_one_gene_wise_scale_of_the_expression_and_zeros_stay_zero():
    x = log_expression()
    out = gene_scale_augmentation(x, N_VIEWS, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out == 0, x == 0)
    ratio = (torch.expm1(out) / torch.expm1(x)).view(N_VIEWS, N_ANCHORS, N_GENES)
    expressed = (x > 0).view(N_VIEWS, N_ANCHORS, N_GENES)
    for view in range(N_VIEWS):
        for gene in range(N_GENES):
            values = ratio[view, :, gene][expressed[view, :, gene]]
            if len(values) > 1:  # every cell of a view shares the gene's factor
                torch.testing.assert_close(values, values[0].expand_as(values))
    # the views of a cell differ: one factor vector per view
    x = torch.full((N_VIEWS * N_ANCHORS, N_GENES), 1.0)
    out = gene_scale_augmentation(x, N_VIEWS, 0.5, torch.Generator().manual_seed(1))
    per_view = out.view(N_VIEWS, N_ANCHORS, N_GENES)[:, 0]
    assert (per_view[1:] != per_view[0]).all()


def test_the_log_factors_have_the_requested_spread():
    x = torch.full((2 * 1000, 2000), float(torch.log1p(torch.tensor(4.0))))
    out = gene_scale_augmentation(x, 2, 0.7, torch.Generator().manual_seed(2))
    log_factors = torch.log(torch.expm1(out[::1000]) / 4.0)  # one row per view
    assert abs(log_factors.std().item() - 0.7) < 0.03
    assert abs(log_factors.mean().item()) < 0.03


def test_training_views_are_augmented_and_reconstruction_targets_stay_clean():
    batch = make_batch()
    module = make_module(gene_scale_sd=0.5)
    with torch.no_grad():
        evaluated = module.compute_losses(batch)
        clean = make_module().compute_losses(batch)
        module.train()
        torch.manual_seed(0)
        trained = module.compute_losses(batch)
    torch.testing.assert_close(evaluated["loss"], clean["loss"])  # inference never augments
    assert not torch.isclose(trained["swav"], evaluated["swav"])
    # the target is the clean x: reconstructing the augmented input instead would differ
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        encoded = gene_scale_augmentation(batch["x"], N_VIEWS, 0.5)
        outputs = module.cvae(encoded, batch["study"])
        expected = module.cvae.loss(batch["x"], batch["study"], outputs)
    torch.testing.assert_close(trained["recon"], expected["recon"])
