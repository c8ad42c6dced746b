"""Collect a finished sweep into sweep.csv, sweep.md and sweep.png.

python train.py -m loss.lambda_prop=0,1,3 sinkhorn.epsilon=0.02,0.05 hydra.sweep.dir=S
python scripts/collect_sweep.py S                         # writes into S
python scripts/collect_sweep.py S --out benchmarks/my_sweep --metrics scib/total scib/bio
"""

import argparse

from scproto.sweeps import DEFAULT_METRICS, collect_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="hydra.sweep.dir of a finished multirun")
    parser.add_argument("--out", help="where to write the table and plot (default: sweep_dir)")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metrics.json keys to show"
    )
    args = parser.parse_args()
    table = collect_sweep(args.sweep_dir, args.out, args.metrics)
    print(f"{len(table)} jobs collected into {args.out or args.sweep_dir}/sweep.{{csv,md,png}}")


if __name__ == "__main__":
    main()
