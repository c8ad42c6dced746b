"""Time and memory of each stage of scProto from 30,000 to a million cells.

    python scripts/benchmark_scale.py                       # 30k, 300k and 1M cells
    python scripts/benchmark_scale.py --cells 30000 --steps 5   # quick look

Each size runs in its own process (so each peak RSS is its own): the embedded generator
(2,000 genes, 5 studies, all of them reference, no counts layer), then the training
data path exactly as `train.py` runs it (in-place log-normalisation, HVGs, PCA fitted on at
most `data.pca_max_cells` cells, the faiss index `data.knn_index=auto` picks, with its
recall@50 against exact search on 500 cells), then `--steps` training steps, from which
s/epoch is extrapolated. Prints a markdown table; `benchmarks/scale.md` holds a recorded run.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

STAGES = ("generate", "log-normalise", "PCA", "kNN")


def one_size(n_cells: int, steps: int, cvae_views: int | None, accelerator: str) -> dict:
    import numpy as np
    import pytorch_lightning as pl
    import torch

    from scproto.data.datamodule import ScProtoDataModule
    from scproto.datasets.synthetic import make_synthetic
    from scproto.model.module import ScProtoModule

    row = {"cells": n_cells}
    start = time.perf_counter()
    adata = make_synthetic(
        n_cells=n_cells, n_genes=2000, n_studies=5, query_studies=0, counts_layer=False
    )
    row["generate"] = time.perf_counter() - start
    row["peak_generate_gb"] = peak_rss_gb()
    row["nnz"] = int(adata.X.nnz)
    datamodule = ScProtoDataModule(
        adata,
        batch_key="study",
        query_studies=adata.uns["query_studies"],
        n_top_genes=2000,
        inplace=True,
        seed=0,
    )
    del adata
    datamodule.setup()
    timings = datamodule.timings
    row["log-normalise"] = timings["log-normalise"]
    row["PCA"] = timings["PCA"]
    knn_stage = next(k for k in timings if "NN" in k)
    row["kNN"], row["index"] = timings[knn_stage], knn_stage.split("(")[1].split(",")[0]
    row["recall"] = datamodule.knn_recall
    row["reference"] = len(datamodule.train_index)
    module = ScProtoModule(
        len(datamodule.spec.genes),
        len(datamodule.studies),
        cvae_views=cvae_views,
        optimizer={"name": "lars", "lr": 4.8},
    )
    stamps = []

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *args):
            stamps.append(time.perf_counter())

    trainer = pl.Trainer(
        accelerator=accelerator,
        max_steps=steps + 3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Stamp()],
    )
    trainer.fit(module, datamodule=datamodule)
    step_s = float(np.median(np.diff(stamps)[2:]))
    row["step_s"] = step_s
    row["epoch_s"] = step_s * (row["reference"] // datamodule.batch_size)
    row["peak_gb"] = peak_rss_gb()
    row["device"] = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
    return row


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def table(rows: list[dict]) -> str:
    lines = [
        "| cells | non-zeros | reference | generate s | log-normalise s | PCA s | kNN s "
        "| index | recall@50 | s/step | s/epoch | peak RSS GB (generation) | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cells']:,} | {r['nnz'] / 1e6:.0f}M | {r['reference']:,} | {r['generate']:.0f} "
            f"| {r['log-normalise']:.1f} | {r['PCA']:.1f} | {r['kNN']:.1f} | {r['index']} "
            f"| {r['recall']:.3f} | {r['step_s']:.3f} | {r['epoch_s']:.0f} "
            f"| {r['peak_generate_gb']:.1f} | {r['peak_gb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[30_000, 300_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--cvae-views", type=int, default=None, help="loss.cvae_views")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        row = one_size(args.one, args.steps, args.cvae_views, args.accelerator)
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    for n_cells in args.cells:
        command = [sys.executable, __file__, "--one", str(n_cells), "--steps", str(args.steps)]
        command += ["--accelerator", args.accelerator]
        if args.cvae_views:
            command += ["--cvae-views", str(args.cvae_views)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            sys.exit(f"{n_cells} cells failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(found[0][4:]))
        print(f"{n_cells:,} cells done", file=sys.stderr, flush=True)
    import torch

    print(table(rows))
    print(
        f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {rows[0]['device']}; "
        f"loss.cvae_views={args.cvae_views or 'all'}."
    )


if __name__ == "__main__":
    main()
