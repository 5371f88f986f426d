#!/usr/bin/env bash
# One GPU-machine session: install, then the named stages, results packed for the trip back.
#   bash scripts/gpu_session.sh install info tests bench sweep
# Stages: install, info, tests (pytest -m gpu), bench (the whole benchmark suite, bench/), one
# benchmark file each (decode, breakdown, compile, capture, smsweep, sglang), sweep (`bullet sweep`)
# and the investigations (greendiag). BENCH_SIZE=quick|full sizes the suite (default
# quick); SWEEP_ARGS go to `bullet sweep`; the sglang stage reads SGLANG_MODEL_DIR and SGLANG_SITE.
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
bench_stage() {  # bench_stage NAME [PATH... OPTION...]: the benchmark suite, or some files of it
  local name=$1; shift
  local stamp gpu
  stamp=$(date -u +%Y%m%d)
  gpu=$(python3 -c 'from bullet_kernels.device import describe_state; from bullet_kernels.results import gpu_slug
d, _ = describe_state(); print(gpu_slug(d.name if d else "none"))' 2>/dev/null || echo gpu)
  stage "$name" python3 -m pytest "${@:-bench/}" -m gpu -q -p no:cacheprovider --bench-size "${BENCH_SIZE:-quick}" \
    --benchmark-json "bench/results/pytest-benchmark-$name-$gpu-$stamp.json"
}
for s in "$@"; do
  case $s in
    install)   stage install env BULLET_OFFLINE=1 bash scripts/install.sh ;;
    info)      stage info bullet info --json bench/results/info.json ;;
    tests)     stage tests python3 -m pytest -m gpu -q -p no:cacheprovider ;;
    bench)     bench_stage bench ;;
    decode)    bench_stage decode bench/test_decode_partitions.py ;;
    breakdown) bench_stage breakdown bench/test_decode_breakdown.py ;;
    compile)   bench_stage compile bench/test_compile_backend.py ;;
    capture)   bench_stage capture bench/test_capture_bank.py ;;
    smsweep)   bench_stage smsweep bench/test_sm_sweep.py ;;
    sglang)    bench_stage sglang bench/test_sglang_compare.py \
                 --sglang-model-dir "${SGLANG_MODEL_DIR:-.carry/llama-3.1-8b-dummy}" --sglang-pythonpath "${SGLANG_SITE:-/tmp/site}" ;;
    sweep)     stage sweep bullet sweep ${SWEEP_ARGS:-} ;;
    greendiag) stage greendiag python3 bench/investigations/green_diagnose.py ;;
    *) echo "unknown stage $s"; failed+=("$s") ;;
  esac
done
echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
