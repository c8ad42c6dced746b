"""Data parallel = one process on the global minibatch: two gloo ranks, each with its share
of the anchors, give the same Sinkhorn codes, the same loss and (after DDP's gradient
averaging) the same gradients as one process holding the whole minibatch."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scproto.model.distributed import gather_scores
from scproto.model.module import ScProtoModule
from scproto.model.sinkhorn import sinkhorn

N_VIEWS, N_ANCHORS, N_GENES, N_STUDIES, WORLD = 4, 24, 30, 3, 2


def make_module() -> ScProtoModule:
    torch.manual_seed(0)
    # lambda_geometry=0: L_geometry is a mean over each shard's own anchors, like L_cvae
    module = ScProtoModule(
        N_GENES,
        N_STUDIES,
        n_views=N_VIEWS,
        n_prototypes=10,
        hidden_dim=16,
        min_group_size=4,
        lambda_geometry=0.0,
    )
    return module.eval()  # z = μ: the reparameterisation noise would differ between shards


def global_batch() -> dict[str, torch.Tensor]:
    """View-major rows (row v·B + i is view v of anchor i), studies of uneven sizes."""
    rng = np.random.default_rng(1)
    x = rng.gamma(1.0, 1.0, size=(N_VIEWS * N_ANCHORS, N_GENES)).astype(np.float32)
    anchor_study = rng.choice(N_STUDIES, size=N_ANCHORS, p=[0.5, 0.35, 0.15])
    study = np.tile(anchor_study, N_VIEWS)
    return {"x": torch.from_numpy(x), "study": torch.from_numpy(study)}


def shard(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of the anchors, as ViewBatchSampler hands it out."""
    share = N_ANCHORS // WORLD
    columns = slice(rank * share, (rank + 1) * share)
    return {
        key: value.view(N_VIEWS, N_ANCHORS, *value.shape[1:])[:, columns].reshape(
            -1, *value.shape[1:]
        )
        for key, value in batch.items()
    }


def step(module: ScProtoModule, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss terms, Sinkhorn codes of view 0 on the (gathered) scores, and gradients."""
    module.zero_grad()
    terms = module.compute_losses(batch)
    terms["loss"].backward()
    with torch.no_grad():
        local = module.scores(module.cvae(batch["x"], batch["study"])["mu"])
        scores = gather_scores(local.view(N_VIEWS, -1, local.shape[-1]), dim=1)
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return {
        "terms": {k: float(terms[k].detach()) for k in ("loss", "swav", "prop", "cvae")},
        "codes": sinkhorn(scores[0]),
        "grads": grads,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, port: int, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        out = step(make_module(), shard(global_batch(), rank))
        for grad in out["grads"].values():  # what DDP does to the gradients
            dist.all_reduce(grad)
            grad /= WORLD
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_and_ranks():
    single = step(make_module(), global_batch())
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            rank_worker, args=(free_port(), results), nprocs=WORLD, start_method="spawn"
        )
        ranks = [results[r] for r in range(WORLD)]
    return single, ranks


def test_every_rank_sees_the_sinkhorn_codes_of_the_global_minibatch(single_and_ranks):
    single, ranks = single_and_ranks
    for out in ranks:
        assert out["codes"].shape == single["codes"].shape
        torch.testing.assert_close(out["codes"], single["codes"], atol=1e-5, rtol=0)
        assert torch.equal(out["codes"].argmax(1), single["codes"].argmax(1))


def test_loss_equals_one_process_on_the_global_minibatch(single_and_ranks):
    single, ranks = single_and_ranks
    for name in ("swav", "prop"):  # global terms: identical on every rank
        for out in ranks:
            assert out["terms"][name] == pytest.approx(single["terms"][name], abs=1e-5)
    # the CVAE term is a mean over each shard; equal shards average to the global mean
    for name in ("loss", "cvae"):
        mean = np.mean([out["terms"][name] for out in ranks])
        assert mean == pytest.approx(single["terms"][name], abs=1e-5, rel=1e-6)


def test_averaged_gradients_equal_one_process(single_and_ranks):
    single, ranks = single_and_ranks
    assert set(ranks[0]["grads"]) == set(single["grads"])
    assert single["grads"]["prototypes"].abs().sum() > 0
    for name, grad in single["grads"].items():
        scale = grad.abs().max().clamp_min(1.0)
        for out in ranks:
            torch.testing.assert_close(out["grads"][name] / scale, grad / scale, atol=1e-5, rtol=0)
