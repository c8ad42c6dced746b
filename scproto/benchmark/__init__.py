"""Table 1: scProto beside PCA, Harmony, scVI and scPoli on the same data (benchmark.py)."""
