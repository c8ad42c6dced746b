"""Training throughput, peak memory and data-setup time of scProto on synthetic data.

    python scripts/benchmark_throughput.py                 # 30,000 cells × 4,000 genes
    python scripts/benchmark_throughput.py --cells 5000 --genes 1000 --steps 5   # quick look
    python scripts/benchmark_throughput.py --cvae-views all,1 --rounds 3   # side by side

Prints markdown tables; `benchmarks/throughput.md` holds the numbers of a recorded run.
Variants (values of `loss.cvae_views`) are timed in interleaved rounds on the same data in
one process, so machine noise hits them alike; each variant's matmul FLOPs per step
(``torch.utils.flop_counter``) over the machine's measured GEMM rate is its arithmetic floor.
Peak memory is the process's peak RSS above its RSS after the imports, so it counts the
data, the model, the minibatches and the autograd buffers, not the libraries.
"""

import argparse
import gc
import os
import platform
import resource
import threading
import time

import numpy as np
import pytorch_lightning as pl
import scanpy as sc
import torch
from torch.utils.flop_counter import FlopCounterMode

from scproto.data.datamodule import ScProtoDataModule
from scproto.datasets.synthetic import make_synthetic
from scproto.model.module import ScProtoModule


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler(threading.Thread):
    """Highest RSS seen while running, sampled every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_mb()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.01)


class StepTimer(pl.Callback):
    """Wall time of each training step, data loading included."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        if not self.stamps:
            self.stamps.append(time.perf_counter())

    def on_train_batch_end(self, *args) -> None:
        self.stamps.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=30_000)
    parser.add_argument("--genes", type=int, default=4_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--optimizer", default="lars", choices=["lars", "adam"])
    parser.add_argument(
        "--cvae-views", default="all", help="comma-separated loss.cvae_views values, 'all' = null"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per variant")
    args = parser.parse_args()
    variants = [None if v == "all" else int(v) for v in args.cvae_views.split(",")]
    torch.manual_seed(0)
    base_rss = rss_mb()

    start = time.perf_counter()
    adata = make_synthetic(n_cells=args.cells, n_genes=args.genes, query_studies=1, seed=0)
    generate_s = time.perf_counter() - start
    datamodule = ScProtoDataModule(
        adata,
        batch_key="study",
        query_studies=adata.uns["query_studies"],
        n_top_genes=args.genes,
        batch_size=args.batch_size,
        seed=0,
    )
    datamodule.setup()
    reference = datamodule.x[datamodule.train_index]
    matrix_mb = sum(a.nbytes for a in (reference.data, reference.indices, reference.indptr)) / 2**20

    # HVG selection is a no-op when all genes are kept; time scanpy's seurat flavour anyway.
    start = time.perf_counter()
    sc.pp.highly_variable_genes(sc.AnnData(reference), n_top_genes=args.genes // 2, flavor="seurat")
    hvg_s = time.perf_counter() - start
    del adata
    gc.collect()

    optimizer = {"name": args.optimizer, "lr": 4.8 if args.optimizer == "lars" else 1e-3}

    def new_module(cvae_views):
        n_genes, n_studies = len(datamodule.spec.genes), len(datamodule.studies)
        return ScProtoModule(n_genes, n_studies, optimizer=optimizer, cvae_views=cvae_views)

    module = new_module(variants[0])
    model_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    rss_before_training = rss_mb()
    sampler = RssSampler()
    sampler.start()
    step_times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            step_times[variant].extend(timed_steps(new_module(variant), datamodule, args.steps))
    sampler.running = False
    gemm_rate = gemm_flops_per_s()
    variant_rows = []
    for variant in variants:
        times = np.asarray(step_times[variant])
        flops = step_flops(new_module(variant), datamodule)
        floor_s = flops / gemm_rate
        variant_rows.append(
            (
                "all" if variant is None else str(variant),
                f"{np.median(times) * 1000:.0f} (p90 {np.percentile(times, 90) * 1000:.0f})",
                f"{args.batch_size * 8 / np.median(times):,.0f}",
                f"{np.median(step_times[variants[0]]) / np.median(times):.2f}",
                f"{flops / 1e9:.1f}",
                f"{floor_s * 1000:.0f}",
                f"{np.median(times) / floor_s:.1f}",
            )
        )
    times = np.asarray(step_times[variants[0]])
    anchors_per_s = args.batch_size / np.median(times)

    t = datamodule.timings
    pca_s = t.get("PCA", float("nan"))
    knn_s = next((v for k, v in t.items() if "NN" in k), float("nan"))
    rows = [
        (
            "machine",
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        ),
        (
            "data",
            f"{args.cells:,} cells × {args.genes:,} genes, {len(datamodule.train_index):,} reference cells, density {reference.nnz / np.prod(reference.shape):.1%}",
        ),
        ("generate synthetic data", f"{generate_s:.1f} s"),
        ("log-normalise", f"{t['log-normalise']:.2f} s"),
        (f"HVG (scanpy seurat, {args.genes // 2} of {args.genes})", f"{hvg_s:.2f} s"),
        ("PCA 50 (randomized, sparse)", f"{pca_s:.2f} s"),
        ("exact 50-NN (faiss IndexFlatL2)", f"{knn_s:.2f} s"),
        ("data setup: HVG + PCA + kNN", f"{hvg_s + pca_s + knn_s:.2f} s"),
        (
            f"step time, loss.cvae_views={variant_rows[0][0]} (median of {len(times)})",
            f"{np.median(times) * 1000:.0f} ms (p90 {np.percentile(times, 90) * 1000:.0f} ms)",
        ),
        ("throughput: anchor cells/s", f"{anchors_per_s:,.0f}"),
        ("throughput: view rows/s (× 8)", f"{anchors_per_s * 8:,.0f}"),
        ("sparse training matrix", f"{matrix_mb:.0f} MB"),
        ("model parameters", f"{model_mb:.1f} MB"),
        ("RSS after imports", f"{base_rss:.0f} MB"),
        ("RSS before training (data ready)", f"{rss_before_training:.0f} MB"),
        ("peak RSS during training", f"{sampler.peak:.0f} MB"),
        (
            "training peak above imports (data + model + minibatches + autograd)",
            f"{sampler.peak - base_rss:.0f} MB",
        ),
        ("peak RSS of the whole script, generation included", f"{peak_rss_mb():.0f} MB"),
    ]
    print("| quantity | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(
        f"\nGEMM rate of this machine: {gemm_rate / 1e9:.0f} GFLOP/s (float32 matmul, "
        f"{torch.get_num_threads()} threads)\n"
    )
    print(
        "| loss.cvae_views | step ms (p90) | view rows/s | speed-up | matmul GFLOP/step "
        "| floor ms | × floor |\n|---|---|---|---|---|---|---|"
    )
    for row in variant_rows:
        print("| " + " | ".join(row) + " |")


def timed_steps(module: ScProtoModule, datamodule, n_steps: int) -> list[float]:
    """Wall time of each of ``n_steps`` training steps after 3 warm-up steps."""
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=n_steps + 3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return list(np.diff(timer.stamps)[3:])


def step_flops(module: ScProtoModule, datamodule) -> int:
    """Matmul FLOPs of one training step, forward and backward (elementwise work not counted)."""
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    with FlopCounterMode(display=False) as counter:
        module.compute_losses(batch)["loss"].backward()
    return counter.get_total_flops()


def gemm_flops_per_s(size: int = 2048, repeats: int = 10) -> float:
    """The machine's float32 matmul rate on square matrices: the arithmetic ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
