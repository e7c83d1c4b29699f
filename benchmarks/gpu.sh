#!/usr/bin/env bash
# The GPU benchmark, one command for a session with a GPU (issue 21, item 4): DeiT-S and
# DeiT-S-hal, train step and deploy forward, bfloat16, one row per variant: plain, the cuDNN MHSA
# baseline, and pallas (the Triton hMHSA kernels on CUDA; skipped with its reason on CPU).
# Needs jax with CUDA (`pip install "jax[cuda12]==<our jax>"`) and the package installed.
# The JSON is rewritten after every row (a DeiT-S round takes 2-3 minutes on an H200, mostly
# compiles; PVTv2-b1 and NextViT-S train steps longer), so a run cut short keeps its finished rows.
#   benchmarks/gpu.sh [OUT.json] [more benchmarks/models.py flags, which override these]
# PYTHON=/path/to/python picks the interpreter (default: `python` on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu.json}"
shift || true
exec "${PYTHON:-python}" benchmarks/models.py --dtype bfloat16 --models deit_small,deit_small_hal \
  --impls plain,accel,cudnn,pallas --batch 128 --iters 20 --warmup 3 --rounds 3 --json "$OUT" "$@"
