#!/usr/bin/env bash
# The one-shot GPU check: everything a short GPU loan (≈15 min of device time, one call) should produce.
#
#   OUT=/path/to/results bash bench/gpu_check.sh       # on the GPU machine (the device tool provides $OUT)
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_check.sh       # CPU dry run: the same steps, CPU-sized, no build (CI)
#
# Steps (each under its own time limit, together ≤ 8 minutes on an H100/H200; a failing step does not stop the
# ones after it — the summary says which failed and why):
#   env      device, driver, versions, date, git revision, measured device-to-device copy bandwidth
#   install  pip install --no-deps --no-build-isolation -e . with the CUDA extension built (sm_90)
#   tests    the GPU tests (pytest -m gpu, Triton compiled, not interpreted)
#   ops      the op microbenchmarks (python -m bench ops), JSON + markdown
#   e2e      the end-to-end per-step benchmark (python -m bench end_to_end), JSON + markdown
#   lm       Fast FIP in place on a 1.1 B LLaMA-shaped causal LM in bf16 vs plain fwd+bwd tokens/s
#            (python -m bench lm_throughput), JSON + markdown
#   peers    fip_fast vs torch's fused AdamW/SGD, torch.func vmap, BackPACK, PyHessian, the authors' Fast FIP
#            (python -m bench peers; a peer that is not installed is skipped, saying why), JSON + markdown
#   summary  OUT/summary.md: one table of the steps and the headline numbers
# Everything goes under $OUT: commit it (bench/results/gpu/…) after the run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
DRY=${DRY_RUN:-0}
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"

if [ "$DRY" = 1 ]; then
  DEV=cpu; QUICK=--quick; LIM_INSTALL=60; LIM_TESTS=120; LIM_OPS=240; LIM_E2E=240; LIM_LM=120; LIM_PEERS=120
  export TRITON_INTERPRET=1
else
  DEV=cuda; QUICK=; LIM_INSTALL=300; LIM_TESTS=150; LIM_OPS=150; LIM_E2E=90; LIM_LM=120; LIM_PEERS=90
  export TRITON_INTERPRET=0 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
fi

step() {            # step NAME SECONDS CMD... : run CMD with a time limit, log to OUT/NAME.log, record rc and time
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$OUT/steps.tsv"
  echo "   rc=$rc"
}

step env 60 "$PY" -m bench.gpu_env --device "$DEV" --out "$OUT/env.json"
if [ "$DRY" = 1 ]; then
  printf 'install\tskipped\t0\tdry run: no build\n' >> "$OUT/steps.tsv"
else
  step install "$LIM_INSTALL" env FIP_FAST_BUILD_CUDA=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
step tests "$LIM_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
step ops "$LIM_OPS" "$PY" -m bench ops --device "$DEV" $QUICK --markdown --out "$OUT/ops_$DEV.json"
step e2e "$LIM_E2E" "$PY" -m bench end_to_end --device "$DEV" $QUICK --no-asr --out "$OUT/end_to_end_$DEV.json"
step lm "$LIM_LM" "$PY" -m bench lm_throughput --device "$DEV" $QUICK --out "$OUT/lm_throughput_$DEV.json"
step peers "$LIM_PEERS" "$PY" -m bench peers --device "$DEV" $QUICK --out "$OUT/peers_$DEV.json"
"$PY" -m bench.gpu_env --summary "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
