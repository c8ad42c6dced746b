#!/bin/bash
# Default data, full evaluation: the code before issue 10 (BASE, a worktree of cf3bcaf)
# against this checkout, seeds 1 and 2, one job at a time. Metrics: OUT/<code>-<seed>/metrics.json
set -euo pipefail
BASE=${BASE:?set BASE to a worktree of commit cf3bcaf}
NEW=$(git rev-parse --show-toplevel)
OUT=${OUT:-/tmp/seedcmp}
mkdir -p "$OUT"
for seed in 1 2; do
  for code in before after; do
    dir=$BASE; [ "$code" = after ] && dir=$NEW
    (cd "$dir" && python train.py seed=$seed hydra.run.dir="$OUT/$code-$seed" \
      paths.cache_dir="$OUT/cache-$code" trainer.enable_progress_bar=false \
      eval.progress_bar=false > "$OUT/$code-$seed.out" 2>&1)
  done
done
