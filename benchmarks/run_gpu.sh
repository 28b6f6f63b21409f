#!/usr/bin/env bash
# Every benchmark in one call, for a short lease on a GPU machine:
#   PYTHONPATH=. bash benchmarks/run_gpu.sh OUTDIR [SECONDS_PER_BENCHMARK]
# Each benchmark gets a time limit so one slow compile cannot eat the whole lease; JSON reports
# land in OUTDIR, the printed tables in OUTDIR/*.log.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUTDIR [SECONDS]}
limit=${2:-240}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
git rev-parse --short HEAD 2>/dev/null || true
for bench in population rst_step; do
  [ -f "benchmarks/$bench.py" ] || continue
  echo "=== $bench"
  timeout "$limit" python3 -m "benchmarks.$bench" --out "$out/$bench.json" 2>&1 | tee "$out/$bench.log"
done
