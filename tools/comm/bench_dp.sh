#!/usr/bin/env bash
# Data-, tensor- and pipeline-parallel training steps and all-reduce bandwidth on this machine,
# runs alternated so that drift in the machine's load hits every configuration alike.
#   tools/comm/bench_dp.sh [rounds=3] [preset=gpt-s] [batch=8] [seq=256]
set -euo pipefail
rounds=${1:-3}; preset=${2:-gpt-s}; batch=${3:-8}; seq=${4:-256}
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p kiln-cli
cargo build --release -q -p kiln-comm --example allreduce_bw
kiln="$target/release/kiln"
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
for r in $(seq "$rounds"); do
  for plan in "--dp 1" "--dp 2" "--dp 2 --zero 1" "--tp 2" "--pp 2" "--pp 2 --micro-batches 8"; do
    echo "round $r: kiln bench train --preset $preset --batch $batch --seq $seq $plan"
    # shellcheck disable=SC2086
    "$kiln" bench train --preset "$preset" --batch "$batch" --seq "$seq" --steps 5 --warmup 1 $plan --json
  done
  "$target/release/examples/allreduce_bw" 2 100 10
done
