"""Entry point: `python benchmark.py experiment=cellbench benchmark.seeds=[0,1,2]` (Table 1)."""

from scproto.benchmark.harness import main

if __name__ == "__main__":
    main()
