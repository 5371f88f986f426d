#!/usr/bin/env bash
# The serving goodput benchmark on the GPU machine, in stages that each fit one device call:
#
#   bash scripts/serving_goodput.sh install                # ours (offline) + SGLang bins in .carry/sglang/bin*
#   bash scripts/serving_goodput.sh sglang-start [CHUNK]   # SGLang 0.5.15 in the background (setsid);
#       CHUNK=pdmux: SGLang's own --enable-pdmux instead of chunked prefill (label sglang-pdmux);
#       CHUNK=2048-nooverlap: chunked 2048 without the overlap scheduler, which the bullet loop
#       must run without (label sglang-chunk2048-nooverlap: the loop's cost apart from the lanes)
#   bash scripts/serving_goodput.sh sglang-bench [CHUNK]   # wait until it answers, measure, stop it
#       (KEEP=1: leave it running, to measure another trace next)
#   bash scripts/serving_goodput.sh sglang-bullet-start [TPOT]  # SGLang through bullet_sglang --enable-bullet
#   bash scripts/serving_goodput.sh sglang-bullet-policy TPOT[:MODE]  # the running bullet server's policy target (and TPOT mode), set
#       through SGLang's /set_internal_state (no restart: a start captures every stream group's graphs)
#   bash scripts/serving_goodput.sh sglang-stop                # stop it, until the port is free
#   bash scripts/serving_goodput.sh sglang-bench bullet        # ... then measured as label bullet-in-sglang-tpotTPOT
#       (sglang-bench measures the server the last start left, whatever its CHUNK argument says:
#       label, log and pid are kept in /tmp/sglang.label, .logpath and .pid; a start refuses
#       while another server answers on the port)
#   bash scripts/serving_goodput.sh ours MODE [CHUNK]      # bullet serve MODE, measure, stop it
#   bash scripts/serving_goodput.sh split-bins [MB]        # (here, not on the GPU machine) regroup
#       the wheel bins into .carry/sglang/part*/ of at most MB each (default 50): a device call
#       carries at most 64 MiB with the working tree, and the largest wheel (xgrammar) is 43 MB
#   bash scripts/serving_goodput.sh results-aside | results-back  # (here) move the committed
#       results (bench/results/*.xz, .png, .log: 22 MB at 962cddb) out of the working tree for a
#       lease, so the tree and a 43 MB part fit one call, and move them back (RESULTS_ASIDE: the
#       folder, default /tmp/bullet-results-aside; back never overwrites a file in bench/results)
#
# Both engines get the llama-3.1-8b preset (config and shipped tokenizer; SGLang loads it with
# --load-format dummy, random weights) and the same trace, prompts and rates from
# `bullet bench-serving` (seeded). Results: $OUT/serving-<label>-<gpu>-<date>.json and .png;
# `bullet bench-serving --report $OUT/serving-*.json` prints the goodput table. Each run's files
# are also packed into $OUT/pack-<label>.tgz and the loose JSON and PNG removed: a device call
# returns at most 8 files, and a later stage of the same call would otherwise push them out.
# Environment: RATES (req/s), EXTEND_TO (req/s: more rates past RATES while the top one still
# meets the loosest target, up to this; bench-serving --extend-to), PROMPTS (per rate), TRACE (uniform|sglang-random|sharegpt|azure-conversation),
# DRIVER (sglang: requests sent by SGLang's own bench_serving, with TRACE=sglang-random),
# SGLANG_ARGS (more SGLang server options for every SGLang start, bullet's included, e.g.
# --cuda-graph-max-bs 128: bullet captures the decode graphs once per stream group), BULLET_ARGS
# (more --bullet-* options for sglang-bullet-start, e.g. --bullet-step-feedback off) with
# BULLET_LABEL (appended to its label, e.g. -nofeedback),
# MODEL (ours; default llama-3.1-8b), DEVICE (ours; default cuda), SERVE_ARGS (more `bullet serve`
# options, e.g. --tpot-slo-ms 10), LABEL (results name; a trace other than uniform is appended,
# e.g. chunked512-sharegpt), OUT (default /tmp/bullet-out), SERVER_LOGS (the SGLang servers' logs,
# default /tmp/sglang-logs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bullet-out}
# A server's log lives outside $OUT: the server outlives the call that started it, and each device
# call gets a new, empty $OUT (a log written there was lost with its call's folder, 2026-12-02).
# gpu_session.sh packs a copy of every log here at the end of each call.
SERVER_LOGS=${SERVER_LOGS:-/tmp/sglang-logs}
mkdir -p "$SERVER_LOGS"
RATES=${RATES:-"10 13 16 19 22 28"}
PROMPTS=${PROMPTS:-200}
TRACE=${TRACE:-uniform}
MODEL=${MODEL:-llama-3.1-8b}
SG=.carry/sglang
ASIDE=${RESULTS_ASIDE:-/tmp/bullet-results-aside}  # results-aside / results-back
mkdir -p "$OUT"

answers() {  # answers URL: whether it answers within 2 s
  python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null
}

wait_up() {  # wait_up URL SECONDS [PID]: until URL answers; gives up at once if process PID has exited
  local url=$1 limit=$2 pid=${3:-} t=0
  until answers "$url"; do
    # a server that died at start (SGLang's pdmux did, 21 s in) must not hold the call for minutes
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then echo "the server (pid $pid) exited after $t s"; return 1; fi
    sleep 2; t=$((t + 2))
    if [ "$t" -ge "$limit" ]; then echo "no answer from $url after $limit s"; return 1; fi
  done
  echo "$url answers after $t s"
}

port_free() {  # a start refuses while a server still answers on :30000 (the next bench would measure it)
  if answers http://127.0.0.1:30000/health; then
    echo "a server still answers on port 30000 ($(cat /tmp/sglang.label 2>/dev/null)): stop it first (sgstop)"; return 1
  fi
}

stop_sglang() {  # every SGLang server (plain or through bullet_sglang), until the port is free (<= 60 s)
  kill "$(cat /tmp/sglang.pid 2>/dev/null)" 2>/dev/null
  pkill -f "[s]glang.launch_server"
  for _ in $(seq 60); do answers http://127.0.0.1:30000/health || return 0; sleep 1; done
  echo "port 30000 still answers 60 s after the stop"; return 1
}

trace_suffix() {  # runs on another trace than the standard one, or sent by SGLang's benchmark, say so
  local suffix=""
  [ "$TRACE" = uniform ] || suffix="-$TRACE"
  echo "$suffix${DRIVER:+-by-$DRIVER}"
}

bench() {  # bench URL LABEL
  bullet bench-serving --url "$1" --label "$2" --model "$MODEL" --trace "$TRACE" --rates $RATES --num-prompts "$PROMPTS" --out "$OUT" \
    ${EXTEND_TO:+--extend-to "$EXTEND_TO"} \
    ${DRIVER:+--driver "$DRIVER" --sglang-pythonpath /tmp/site}
  local rc=$?
  (cd "$OUT" && tar czf "pack-$2.tgz" $(ls serving-"$2"-*.json serving-"$2"-*.png ./*.log metrics-*.txt 2>/dev/null) \
     && rm -f serving-"$2"-*.json serving-"$2"-*.png)
  return $rc
}

case ${1:-} in
  split-bins)
    python3 - "${2:-50}" "$SG" <<'PY'
import os, sys
from pathlib import Path
limit, sg = float(sys.argv[1]) * 2**20, Path(sys.argv[2])
files = sorted((f for b in sg.glob("bin*") for f in b.iterdir() if f.is_file()), key=lambda f: -f.stat().st_size)
parts: list[list] = []  # first fit, largest first
for f in files:
    size = f.stat().st_size
    if size > limit:
        sys.exit(f"{f} ({size / 2**20:.0f} MB) alone is over {limit / 2**20:.0f} MB")
    part = next((p for p in parts if p[0] + size <= limit), None)
    if part is None:
        parts.append(part := [0])
    part[0] += size
    part.append(f)
for i, (size, *members) in enumerate(parts, 1):
    d = sg / f"part{i}"
    d.mkdir(exist_ok=True)
    for f in members:
        if not (d / f.name).exists():
            os.link(f, d / f.name)
    print(f"{d}: {len(members)} files, {size / 2**20:.0f} MB")
PY
    ;;
  results-aside)  # nothing on the GPU machine reads old results; new ones come back in the session archive
    mkdir -p "$ASIDE"
    git ls-files -z bench/results | grep -zE '\.(xz|png|log)$' | xargs -0 -r mv -n -t "$ASIDE"
    echo "committed results moved to $ASIDE; bring them back with: bash scripts/serving_goodput.sh results-back" ;;
  results-back)  # moved back as they were (a checkout would also undo edits made to them before)
    [ -d "$ASIDE" ] || { echo "no results set aside in $ASIDE"; exit 1; }
    find "$ASIDE" -maxdepth 1 -type f -exec mv -n -t bench/results {} +
    left=$(find "$ASIDE" -maxdepth 1 -type f | wc -l)
    [ "$left" = 0 ] || { echo "$left files left in $ASIDE: bench/results has files of those names"; exit 1; }
    rmdir "$ASIDE" && echo "committed results moved back" ;;
  install)
    BULLET_OFFLINE=1 bash scripts/install.sh
    for b in "$SG"/bin*; do [ -d "$b" ] && bash "$SG/install.sh" "$b"; done ;;
  sglang-start)
    port_free || exit 1
    chunk=${2:-2048}
    # pdmux: SGLang's own PD multiplexing (green contexts), which refuses chunked prefill
    mode_args=(--chunked-prefill-size "${chunk%-nooverlap}")
    [ "$chunk" = pdmux ] && mode_args=(--chunked-prefill-size -1 --enable-pdmux --disable-overlap-schedule)
    [ "$chunk" != "${chunk%-nooverlap}" ] && mode_args+=(--disable-overlap-schedule)
    label="sglang-chunk$chunk"; [ "$chunk" = pdmux ] && label=sglang-pdmux
    python3 -c "from bullet_kernels.models.presets import write_model_dir; write_model_dir('llama-3.1-8b', '$SG/model')"
    PYTHONPATH=/tmp/site setsid python3 -m sglang.launch_server --model-path "$SG/model" --load-format dummy \
      --attention-backend flashinfer --sampling-backend pytorch --disable-radix-cache \
      "${mode_args[@]}" --mem-fraction-static 0.80 --port 30000 ${SGLANG_ARGS:-} > "$SERVER_LOGS/sglang-$chunk.log" 2>&1 &
    echo $! > /tmp/sglang.pid; echo "$label" > /tmp/sglang.label; echo "$SERVER_LOGS/sglang-$chunk.log" > /tmp/sglang.logpath
    echo "SGLang (chunk $chunk${SGLANG_ARGS:+, $SGLANG_ARGS}) starting; its first start takes about 4.5 minutes" ;;
  sglang-bullet-start)
    port_free || exit 1
    tpot=${2:-15}
    python3 -c "from bullet_kernels.models.presets import write_model_dir; write_model_dir('llama-3.1-8b', '$SG/model')"
    PYTHONPATH=/tmp/site setsid python3 -m bullet_sglang.launch_server --model-path "$SG/model" --load-format dummy \
      --attention-backend flashinfer --sampling-backend pytorch --disable-radix-cache --mem-fraction-static 0.80 \
      --port 30000 --enable-bullet --bullet-tpot-slo-ms "$tpot" ${BULLET_ARGS:-} ${SGLANG_ARGS:-} \
      > "$SERVER_LOGS/sglang-bullet-tpot$tpot${BULLET_LABEL:-}.log" 2>&1 &
    echo $! > /tmp/sglang.pid; echo "bullet-in-sglang-tpot$tpot${BULLET_LABEL:-}" > /tmp/sglang.label
    echo "$SERVER_LOGS/sglang-bullet-tpot$tpot${BULLET_LABEL:-}.log" > /tmp/sglang.logpath
    echo "SGLang with --enable-bullet (policy $tpot ms${BULLET_ARGS:+, $BULLET_ARGS}${SGLANG_ARGS:+, $SGLANG_ARGS}) starting; its first start takes minutes" ;;
  sglang-bullet-policy)  # TPOT[:MODE], MODE step or average (the policy's TPOT mode)
    arg=${2:?usage: sglang-bullet-policy TPOT[:step|average]}
    tpot=${arg%%:*}; mode=""; [ "$arg" != "$tpot" ] && mode=${arg#*:}
    wait_up http://127.0.0.1:30000/health 540 "$(cat /tmp/sglang.pid 2>/dev/null)" || exit 1
    python3 - "$tpot" "$mode" <<'PY' || exit 1
import json, sys, urllib.request
targets = {"bullet_tpot_slo_ms": float(sys.argv[1])}
if sys.argv[2]:
    targets["bullet_tpot_mode"] = sys.argv[2]
body = json.dumps({"server_args": targets}).encode()
req = urllib.request.Request("http://127.0.0.1:30000/set_internal_state", body, {"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
print("set_internal_state:", answer)
sys.exit(0 if answer and all(answer) else 1)
PY
    echo "bullet-in-sglang-tpot$tpot${mode:+-$mode}${BULLET_LABEL:-}" > /tmp/sglang.label ;;
  sglang-bench)
    log=$(cat /tmp/sglang.logpath 2>/dev/null); label=$(cat /tmp/sglang.label 2>/dev/null)
    pid=$(cat /tmp/sglang.pid 2>/dev/null)
    [ -n "$label" ] && [ -n "$pid" ] || { echo "no SGLang server was started (sglang-start or sglang-bullet-start)"; exit 1; }
    wait_up http://127.0.0.1:30000/health 540 "$pid" || { tail -20 "$log"; exit 1; }
    kill -0 "$pid" 2>/dev/null || { echo "the server started last (pid $pid, $label) is gone: not measuring another"; exit 1; }
    # The first load after start pays FlashInfer JIT work (a 10 s stall, measured): unrecorded
    # passes first, one paced, one a burst. The burst is what SGLang's first prefill batch of
    # several requests (a full 2,048-token chunk) needs: at 9182cc2 SGLang chunked 2048 froze 10 s
    # at the first such batch in every lease (13 or 16 req/s), after a paced warm-up that never
    # made one.
    for warm in "10 40" "200 64"; do
      read -r warm_rate warm_prompts <<< "$warm"
      bullet bench-serving --url http://127.0.0.1:30000 --label warmup --trace "$TRACE" --rates "$warm_rate" \
        --num-prompts "$warm_prompts" --out /tmp/bullet-warmup > /dev/null 2>&1
    done
    # label: bullet-in-sglang-* is a bullet run in the report (its ratio is against the baselines)
    bench http://127.0.0.1:30000 "$label$(trace_suffix)"; rc=$?
    [ -n "${KEEP:-}" ] || stop_sglang
    exit "$rc" ;;
  sglang-stop) stop_sglang ;;
  ours)
    mode=${2:?usage: ours MODE [CHUNK]}; chunk=${3:-512}
    setsid bullet serve --model "$MODEL" --mode "$mode" --chunk-size "$chunk" --port 30001 \
      ${DEVICE:+--device "$DEVICE"} ${SERVE_ARGS:-} > "$OUT/serve-$mode-$chunk.log" 2>&1 &
    pid=$!
    wait_up http://127.0.0.1:30001/health 600 "$pid" || { tail -20 "$OUT/serve-$mode-$chunk.log"; exit 1; }
    label="$mode"; [ "$mode" = chunked ] && label="chunked$chunk"; label=${LABEL:-$label}$(trace_suffix)
    bench http://127.0.0.1:30001 "$label"; rc=$?
    python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" \
      http://127.0.0.1:30001/metrics > "$OUT/metrics-$label.txt" || true
    kill "$pid"; wait "$pid" 2>/dev/null  # by pid: a pattern could match the caller's command line
    exit "$rc" ;;
  *) sed -n 2,15p "$0"; exit 2 ;;
esac
