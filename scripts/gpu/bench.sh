#!/usr/bin/env bash
# Issue 8's GPU check, one command on a lent GPU machine (it has PyTorch and transformers, but no
# Rust toolchain and no network). Build the CUDA binaries here first:
#
#   cargo build --release -p kosmos-infer --features cuda --bin kosmos
#   cargo build --release -p kosmos-benches --features cuda --bins
#
# then, there, from the repository root (carrying target/release/kosmos, kosmos-compare and
# kosmos-bandwidth):
#
#   bash scripts/gpu/bench.sh [BIN_DIR] [medium full]
#
# 1. `generate_check.py`: the generation fixture cases (greedy, left-padded batch, beam search)
#    through `kosmos --device cuda` must give transformers' tokens (the committed CPU fixtures);
#    `--device flex` on the same machine for a timing line.
# 2. `compare.py --torch-device cuda --devices cuda --torch-dtypes float32,bfloat16` for each
#    configuration: transformers on the GPU in float32 (eager and sdpa) and bfloat16 against ours
#    on `cuda`, with the f32 parity check (the same greedy tokens, logits within 1e-3), writing
#    the markdown table.
#
# Everything lands in $OUT (the device tool's output folder) or target/gpu-bench. Exit 1 when a
# check failed; every step runs whatever the one before gave.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN="${1:-target/release}"
shift || true
if [ "$#" -gt 0 ]; then CONFIGS=("$@"); else CONFIGS=(medium); fi
OUT="${OUT:-target/gpu-bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 420 python3 scripts/gpu/generate_check.py "$BIN/kosmos" cuda flex 2>&1 | tee "$OUT/generate_check.txt" || status=1
for config in "${CONFIGS[@]}"; do
    timeout 1200 python3 scripts/bench/compare.py --config "$config" --torch-device cuda --devices cuda \
        --torch-dtypes float32,bfloat16 --binary "$BIN/kosmos-compare" --repeats 5 \
        --out "$OUT/compare" 2>&1 | tee "$OUT/compare-$config.md" || status=1
done
exit $status
