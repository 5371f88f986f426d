#!/usr/bin/env bash
# One GPU-machine call: the named stages in order, everything packed for the trip back.
#   bash scripts/gpu_session.sh install info tests bench sweep
#   DEADLINE=580 bash scripts/gpu_session.sh sgpart:part1 install servetests \
#       "serve:bullet-tpot10:bullet:512:uniform:8,11,14:--tpot-slo-ms 10" sgstart:2048 sg:2048:uniform:8,11,14 sgstop
# Stages: install, info, tests (pytest -m gpu), servetests (the server and kernel GPU tests only, or
# the files in SERVETESTS),
# adaptertest (the SGLang adapter's GPU tests, SGLang from /tmp/site: run the sgpart stages first;
# ADAPTERTEST_ARGS go to pytest, e.g. "-k retraction" for the retraction test alone),
# bench (the whole benchmark suite, bench/), one benchmark file each (decode, breakdown, compile,
# capture, smsweep, roofline, colocation, sglang), profile (`bullet profile --fresh`: this GPU's
# shipped latency profile measured again, used by later stages and copied to bench/results), sweep (`bullet sweep`), the investigations (greendiag,
# greenconn, greenfade: green_cause.py connections (GREENCONN_ARGS, default 2 repeats) and fade; greentest:N: the green cross-lane
# GPU test with BULLET_GREEN_SETTLE_PROBES=N, 0 for off; greenvariants: green_variants.py (GREENVARIANTS,
# default all); interference:
# interference_variants.py; attnmerge: decode_attention_merge.py, fused vs separate split merge,
# ATTNMERGE_ARGS e.g. --quick), and the serving goodput runs of
# scripts/serving_goodput.sh:
#   serve:LABEL:MODE:CHUNK:TRACE:RATES[:SERVE_ARGS]  `bullet serve` measured (RATES comma-separated)
#   sgpart:PART          install one part of the SGLang wheel set (.carry/sglang/PART) into /tmp/site
#   sgstart:CHUNK        start SGLang 0.5.15 (chunked prefill CHUNK) in the background
#   sgbullet:TPOT        start SGLang with bullet_sglang --enable-bullet instead (then sg:bullet:...)
#   sgpolicy:TPOT[:MODE] set the running bullet server's policy target, and its TPOT mode (step or
#                        average) if given (then sg:bullet:... again)
#   sg:CHUNK:TRACE:RATES[:sglang]  measure it (it stays up for the next trace), requests sent by
#                        our load generator or by SGLang's own bench_serving; sgstop: stop it
# export:VAR=VALUE sets an environment variable for the stages after it.
# BENCH_SIZE=quick|full sizes the suite (default quick); SWEEP_ARGS go to `bullet sweep`; the
# sglang stage reads SGLANG_MODEL_DIR and SGLANG_SITE; PROMPTS is the serving runs' requests per rate
# and EXTEND_TO their rate limit for going past RATES (bench-serving --extend-to).
# Each stage runs under LIMIT_<STAGE> seconds (default STAGE_LIMIT, 900), and under what is left of
# DEADLINE (seconds from the start; a device call has a hard limit, and a stage cut off by it
# would lose the archive). Set BULLET_COMMIT to stamp results where the checkout has no .git.
# A failing stage is reported and the next one still runs; the exit code says if any failed.
# At the end, the files this call added to bench/results/ and every log and result under $OUT
# (default /tmp/bullet-out) are packed into $OUT/session-<HHMMSS>.tgz (15 MiB pieces if larger)
# and the loose files removed: a device call returns at most 8 files of at most 16 MiB.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/bullet-out}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
failed=()
T0=$SECONDS
STARTED=$(mktemp /tmp/gpu_session.start.XXXXXX)  # results newer than this were made by this call
new_results() { find bench/results -type f -newer "$STARTED" 2>/dev/null; }
pack_all() {  # one archive (in 15 MiB pieces if larger: a file over 16 MiB does not come back)
  local archive
  archive="session-$(date -u +%H%M%S).tgz"
  # SGLang servers log outside $OUT (serving_goodput.sh: they outlive the call, and each call's $OUT
  # is new): a copy of each log comes back with every call; a stopped server's log only once
  local live=//none// f
  if [ -e /tmp/sglang.pid ] && kill -0 "$(cat /tmp/sglang.pid)" 2>/dev/null; then
    live=$(cat /tmp/sglang.logpath 2>/dev/null)
  fi
  for f in "${SERVER_LOGS:-/tmp/sglang-logs}"/*.log; do
    [ -e "$f" ] || continue
    cp "$f" "$OUT/"
    [ "$f" = "$live" ] || rm -f "$f"
  done
  tar czf "/tmp/$archive" $(new_results) -C "$OUT" $(cd "$OUT" && ls | grep -v '^session-') 2>/dev/null
  (cd "$OUT" && ls | grep -v '^session-' | xargs -r rm -rf)
  if [ ! -e "/tmp/$archive" ]; then
    echo "nothing to pack"
  elif [ "$(stat -c %s "/tmp/$archive")" -gt $((15 << 20)) ]; then
    split -b 15M -d "/tmp/$archive" "$OUT/$archive.part" && rm "/tmp/$archive"
    echo "packed into $OUT/$archive.part* (cat them, then tar xzf)"
  else
    mv "/tmp/$archive" "$OUT/" && echo "packed into $OUT/$archive"
  fi
}
trap pack_all EXIT
stage() {  # stage NAME CMD...: run under a time limit, tee the log, remember failures, pack results
  local name=$1; shift
  local limit_var
  limit_var="LIMIT_$(echo "${name^^}" | tr -c 'A-Z0-9_\n' '_')"
  local limit=${!limit_var:-${STAGE_LIMIT:-900}}
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - (SECONDS - T0) - 20))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 0 ]; then echo "=== $name: skipped, no time left before DEADLINE"; failed+=("$name"); return; fi
  fi
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS log="$OUT/$name.log" n=2
  while [ -e "$log" ]; do log="$OUT/$name-$n.log"; n=$((n + 1)); done  # a stage run twice keeps both logs
  timeout "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || failed+=("$name")
  # after every stage, so a call killed later still returns what this one made
  tar czf "$OUT/results.tgz" $(new_results) 2>/dev/null || true
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
    servetests) stage servetests python3 -m pytest -m gpu -q -p no:cacheprovider ${SERVETESTS:-tests/test_serve_gpu.py tests/test_kernels_gpu.py} ;;
    adaptertest) stage adaptertest env BULLET_SGLANG_PYTHONPATH=/tmp/site BULLET_SGLANG_LOG_DIR="$OUT" \
                   python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_sglang_adapter_gpu.py ${ADAPTERTEST_ARGS:-} ;;
    bench)     bench_stage bench ;;
    decode)    bench_stage decode bench/test_decode_partitions.py ;;
    breakdown) bench_stage breakdown bench/test_decode_breakdown.py ;;
    compile)   bench_stage compile bench/test_compile_backend.py ;;
    capture)   bench_stage capture bench/test_capture_bank.py ;;
    smsweep)   bench_stage smsweep bench/test_sm_sweep.py ;;
    roofline)  bench_stage roofline bench/test_roofline.py ;;
    colocation) bench_stage colocation bench/test_colocation.py ;;
    profile)   stage profile bash -c 'bullet profile --fresh || exit 1; for f in graphs/*/llama-3.1-8b.json; do
                 [ "$f" -nt "'"$STARTED"'" ] && cp "$f" "bench/results/profile-$(basename "$(dirname "$f")")-llama-3.1-8b-$(date -u +%Y%m%d).json"; done; exit 0' ;;
    sglang)    bench_stage sglang bench/test_sglang_compare.py \
                 --sglang-model-dir "${SGLANG_MODEL_DIR:-.carry/llama-3.1-8b-dummy}" --sglang-pythonpath "${SGLANG_SITE:-/tmp/site}" ;;
    sweep)     stage sweep bullet sweep ${SWEEP_ARGS:-} ;;
    greendiag) stage greendiag python3 bench/investigations/green_diagnose.py ;;
    greenconn) stage greenconn python3 bench/investigations/green_cause.py connections ${GREENCONN_ARGS:-2} ;;
    greenfade) stage greenfade python3 bench/investigations/green_cause.py fade ;;
    greenvariants) stage greenvariants python3 bench/investigations/green_variants.py ${GREENVARIANTS:-all} ;;
    greentest:*) stage "greentest-settle${s#greentest:}" env BULLET_GREEN_SETTLE_PROBES="${s#greentest:}" \
                   python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_green_cross_lane_gpu.py ;;
    interference) stage interference python3 bench/investigations/interference_variants.py ;;
    attnmerge) stage attnmerge python3 bench/investigations/decode_attention_merge.py ${ATTNMERGE_ARGS:-} ;;  # JSON in $OUT
    serve:*)   IFS=: read -r _ label mode chunk trace rates sargs <<< "$s"
               RATES=${rates//,/ } TRACE=$trace LABEL=$label SERVE_ARGS=${sargs:-} \
                 stage "run-$label-$trace" bash scripts/serving_goodput.sh ours "$mode" "$chunk"
               grep -h "^goodput" "$(ls -t "$OUT/run-$label-$trace"*.log | head -1)" ;;
    sgpart:*)  stage "sgpart-${s#sgpart:}" bash .carry/sglang/install.sh ".carry/sglang/${s#sgpart:}" ;;
    sgstart:*) stage sgstart bash scripts/serving_goodput.sh sglang-start "${s#sgstart:}" ;;
    sg:*)      IFS=: read -r _ chunk trace rates driver <<< "$s"
               RATES=${rates//,/ } TRACE=$trace DRIVER=${driver:-} KEEP=1 stage "sg-$chunk-$trace${driver:+-$driver}" bash scripts/serving_goodput.sh sglang-bench "$chunk"
               grep -h "^goodput\|answers" "$(ls -t "$OUT/sg-$chunk-$trace${driver:+-$driver}"*.log | head -1)" ;;
    sgbullet:*) stage sgbullet bash scripts/serving_goodput.sh sglang-bullet-start "${s#sgbullet:}" ;;
    sgpolicy:*) stage sgpolicy bash scripts/serving_goodput.sh sglang-bullet-policy "${s#sgpolicy:}" ;;
    sgstop)    stage sgstop bash scripts/serving_goodput.sh sglang-stop ;;
    export:*)  if export "${s#export:}"; then echo "=== export ${s#export:} (for the stages after it)"; else failed+=("$s"); fi ;;
    *) echo "unknown stage $s"; failed+=("$s") ;;
  esac
done
echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
