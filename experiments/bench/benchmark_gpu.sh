#!/usr/bin/env bash
# The README's accelerator rows in one short run: inference and training of the paper's model at
# 256 x 256, two modalities, bf16 at batch 32 and float32 at batch 4.  Needs an accelerator jaxlib
# (e.g. pip install -U "jax[cuda12]").  Run from the repository root:
#   bash experiments/bench/benchmark_gpu.sh [OUT_DIR]
# Writes one JSON per row into ${1:-bench_gpu}/.
set -euo pipefail
out=${1:-bench_gpu}
mkdir -p "$out"
run() {  # mode dtype batch
  python -m experiments.bench.benchmark --config=configs/unified.py --mode="$1" --config.model.dtype="$2" \
    --batch-size="$3" --modalities=2 --image-size=256 --steps=10 --warmup=2 --json="$out/$1_$2_b$3.json"
}
run infer bfloat16 32
run infer float32 4
run train bfloat16 32
run train float32 4
