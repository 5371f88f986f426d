#!/usr/bin/env bash
# One GPU-machine session: install, then the named stages, results packed for the trip back.
#   bash scripts/gpu_session.sh install info tests decode compile sweep capture sglang
# Logs go to $OUT (default /tmp/bullet-out); bench/results/ is packed into $OUT/results.tgz.
# Each stage runs under LIMIT_<STAGE> seconds (default STAGE_LIMIT, 900); set BULLET_COMMIT to
# stamp results where the checkout has no .git.
# A failing stage is reported and the next one still runs; the exit code says if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bullet-out}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
failed=()
stage() {  # stage NAME CMD...: run under a time limit, tee the log, remember failures, pack results
  local name=$1; shift
  local limit_var="LIMIT_${name^^}"
  local limit=${!limit_var:-${STAGE_LIMIT:-900}}
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || failed+=("$name")
  tar czf "$OUT/results.tgz" bench/results  # after every stage: a later time-out loses nothing
}
for s in "$@"; do
  case $s in
    install) stage install env BULLET_OFFLINE=1 bash scripts/install.sh ;;
    info)    stage info bullet info --json bench/results/info.json ;;
    tests)   stage tests python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 600 ;;
    decode)  stage decode python3 bench/bench_decode.py --quick ;;
    breakdown) stage breakdown python3 bench/decode_breakdown.py --quick ;;
    compile) stage compile python3 bench/bench_compile.py ;;
    tpcdiag) stage tpcdiag python3 -X faulthandler -u bench/tpc_diagnose.py ;;
    greendiag) stage greendiag python3 bench/green_diagnose.py ;;
    tune) stage tune python3 bench/tune_decode_attention.py ;;
    sweep)   stage sweep bullet sweep ${SWEEP_ARGS:-} ;;
    capture) stage capture python3 bench/capture_bank.py ;;
    sglang)  stage sglang python3 bench/sglang_compare.py --model-dir .carry/llama-3.1-8b-dummy \
               --sweep-json "$(ls -t bench/results/sm-sweep-*.json | head -1)" ;;
    *) echo "unknown stage $s"; failed+=("$s") ;;
  esac
done
echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
