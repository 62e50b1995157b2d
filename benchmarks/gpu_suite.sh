#!/usr/bin/env bash
# The accelerator suite (issue #19) on one GPU: train-step throughput and model FLOP/s of dsv3_jax and
# transformers on configs/gpu_bench.py (BF16 and FP8 steps, a profile's top ops), the routed experts'
# grouped GEMM against a dense GEMM of the same FLOPs, the FP8 block-scaled GEMM table at V3 projection
# shapes, and the FP8-vs-BF16 loss gap over 100 steps. Writes OUT/suite.json and OUT/suite.md (one table
# with the targets), plus each part's log and JSON.
#
#   bash benchmarks/gpu_suite.sh [OUT]            # default OUT: benchmarks/out/gpu_suite-<date>
#   bash benchmarks/gpu_suite.sh --smoke [OUT]    # tiny shapes, one step: checks the suite itself (CPU)
#
# PYTHON picks the interpreter (default: python); GPU_SUITE_PARTS a subset of the parts (default: all of
# "train grouped_gemm fp8_gemm fp8_loss_gap"). Every part runs even if an earlier one failed; the exit status
# is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
OUT="${OUT:-benchmarks/out/gpu_suite-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

if [ "$SMOKE" = 1 ]; then
  TRAIN=(--config configs/tiny.py --batch 2 --seq 32 --warmup 1 --steps 1 --skip nomtp --matmul_n 256)
  GROUPED=(--smoke)
  FP8GEMM=(--quick)
  GAP=(--config configs/tiny.py --steps 2 --log-every 1)
else
  TRAIN=(--config configs/gpu_bench.py --warmup 2 --steps 5 --skip nomtp --torch_bf16 autocast)
  GROUPED=(--config configs/gpu_bench.py)
  FP8GEMM=(--quick --iters 10)
  GAP=(--config configs/gpu_bench.py --steps 100 --log-every 10 --dtype bfloat16)
fi

PARTS=" ${GPU_SUITE_PARTS:-train grouped_gemm fp8_gemm fp8_loss_gap} report "
status=0
run() {  # run NAME CMD...: output to the console and OUT/NAME.log, seconds taken to OUT/NAME.seconds
  local name="$1"; shift
  case "$PARTS" in *" $name "*) ;; *) echo "== $name: not selected (GPU_SUITE_PARTS)"; return ;; esac
  echo "== $name: $*"
  local start
  start=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo $(( $(date +%s) - start )) > "$OUT/$name.seconds"
  echo "== $name: exit $rc after $(cat "$OUT/$name.seconds") s"
  if [ "$rc" != 0 ] && [ "$status" = 0 ]; then status=$rc; fi
}

run train "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --fp8 --profile "$OUT/trace" --json "$OUT/train.json"
run grouped_gemm "$PY" benchmarks/grouped_gemm.py "${GROUPED[@]}" --json "$OUT/grouped_gemm.json"
run fp8_gemm "$PY" benchmarks/fp8_gemm.py "${FP8GEMM[@]}" --json "$OUT/fp8_gemm.json"
run fp8_loss_gap "$PY" benchmarks/fp8_training.py "${GAP[@]}" --workdir "$OUT/fp8_runs" --json "$OUT/fp8_loss_gap.json"
run report "$PY" benchmarks/gpu_suite_report.py "$OUT"
exit "$status"
