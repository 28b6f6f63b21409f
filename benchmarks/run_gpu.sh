#!/usr/bin/env bash
# Benchmarks in one call, for a short lease on a GPU machine:
#   PYTHONPATH=. bash benchmarks/run_gpu.sh OUTDIR [SECONDS_PER_BENCHMARK] [NAME ...]
# NAMEs default to every benchmark (population rst_step aws distill). Each gets a time limit so
# one slow compile cannot eat the whole lease; JSON reports land in OUTDIR, the printed tables in
# OUTDIR/*.log.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUTDIR [SECONDS] [NAME ...]}
limit=${2:-240}
shift $(( $# < 2 ? $# : 2 ))
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(population rst_step aws distill)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
git rev-parse --short HEAD 2>/dev/null || true
for bench in "${benches[@]}"; do
  echo "=== $bench"
  timeout "$limit" python3 -m "benchmarks.$bench" --out "$out/$bench.json" 2>&1 | tee "$out/$bench.log"
done
