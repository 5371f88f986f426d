"""``bullet serve`` and ``bullet bench-serving``: options and what they run (``cli.py`` wires
them in)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..orchestrate.tpot_budget import TPOT_MODES
from .request import DEFAULT_CHUNK_SIZE, MODES, PREFILL_AHEAD

TRACES = ("uniform", "sglang-random", "sharegpt", "azure-conversation")
DEFAULT_TPOT_SLOS_MS = (10.0, 15.0, 20.0, 30.0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a number > 0 (or inf for rates)")
    return value


def tokens_or_zero(text: str) -> int:
    """A token count >= 0 (0: off)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a whole number of tokens >= 0 (0: off)")
    return value


def lane_split(text: str) -> str:
    """A split with exactly the lanes prefill and decode (checked here, before any GPU work)."""
    from ..errors import InvalidSplitError
    from ..orchestrate.policy import check_splits

    try:
        check_splits([text])
    except (InvalidSplitError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def existing_file(text: str) -> str:
    from pathlib import Path

    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file (a JSONL trace: prompt_len, output_len per line)")
    return text


def add_serve_arguments(p: argparse.ArgumentParser, positive_int, presets) -> None:
    p.add_argument("--model", default="llama-3.1-8b", metavar="PRESET|DIR",
                   help="a preset (random weights; one of: %s) or a Hugging Face model directory" % ", ".join(presets))
    p.add_argument("--mode", default="bullet", choices=MODES,
                   help="bullet: prefill and decode lanes at once; chunked: fused chunks; sequential: prefill first")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=30000, help="port to listen on")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when there is a GPU")
    p.add_argument("--max-context", type=positive_int, default=None, help="tokens per request (default: the model's)")
    p.add_argument("--kv-pages", type=positive_int, default=None,
                   help="KV-cache pages (default: sized from free GPU memory, or 256 MiB on the CPU)")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, help="chunked mode: tokens per fused step")
    p.add_argument("--max-running", type=positive_int, default=128, help="largest decode batch")
    p.add_argument("--max-prefill-tokens", type=positive_int, default=8192,
                   help="bullet and sequential modes: prompt tokens admitted into one prefill (smaller: a shorter "
                   "wait for prompts that arrive while one runs; larger: fewer, more efficient prefills)")
    p.add_argument("--max-waiting", type=positive_int, default=1024, help="queued requests before 429")
    p.add_argument("--ttft-slo-ms", type=positive_float, default=1000.0, help="time-to-first-token target (bullet mode)")
    p.add_argument("--tpot-slo-ms", type=positive_float, default=20.0,
                   help="time-per-output-token target: the bullet policy keeps decode steps within it")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="prepare each decode step while the previous one runs on the GPU, feeding its tokens "
                   "there (greedy batches; default on: docs/serving.md has the measurement)")
    p.add_argument("--fuse-prompt-tokens", type=tokens_or_zero, default=0, metavar="N",
                   help="bullet mode: prompts of at most N tokens are prefilled in chunks fused into decode steps "
                   "on the whole GPU (as --mode chunked does, --chunk-size tokens a step) instead of on the "
                   "prefill lane; longer ones still go to the lane (default 0: every prompt to the lane)")
    p.add_argument("--prefill-ahead", type=positive_int, default=None, metavar="GROUPS",
                   help="bullet mode: prefill layer groups kept queued on the prefill lane, topped up once a step "
                   "(more: a short prompt's groups run back to back; fewer: a change of split waits for less; "
                   f"default: {PREFILL_AHEAD})")
    p.add_argument("--backend", default=None, choices=("green", "tpc"),
                   help="bullet mode: SM partition backend of the lanes (default: BULLET_BACKEND, else green). "
                   "On driver 580 a green lane may run on fewer SMs while an overlapping lane of another split "
                   "has run work (docs/green-contexts.md); tpc lanes have no contexts")
    p.add_argument("--split", type=lane_split, default=None, metavar="prefill=P,decode=D",
                   help="bullet mode on a GPU: always this split while both lanes have work, instead of the "
                   "SLO policy over the shipped profile (default: the policy)")


SWITCH_INTERVAL_S = 5e-4


def serve_main(args) -> int:
    from . import server
    from .app import ServeOptions, build_service

    if (args.fuse_prompt_tokens or args.prefill_ahead is not None or args.backend) and args.mode != "bullet":
        print(f"bullet serve: error: --fuse-prompt-tokens, --prefill-ahead and --backend apply to --mode bullet "
              f"(the other modes have no prefill lane); got --mode {args.mode}", file=sys.stderr)
        return 2

    opts = ServeOptions(model=args.model, mode=args.mode, device=args.device, max_context=args.max_context,
                        kv_pages=args.kv_pages, chunk_size=args.chunk_size, max_running=args.max_running,
                        max_waiting=args.max_waiting, max_prefill_tokens=args.max_prefill_tokens,
                        ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms,
                        split=args.split, overlap=args.overlap, fuse_prompt_tokens=args.fuse_prompt_tokens,
                        prefill_ahead=args.prefill_ahead or PREFILL_AHEAD, backend=args.backend)
    service = build_service(opts)
    kv = service.engine.scheduler.runner.kv_cache
    print(f"bullet serve: {service.model} ({opts.mode} mode) on {service.engine.scheduler.runner.device}, "
          f"{kv.num_pages} KV pages of {kv.page_size} tokens; tokenizer: {service.tokenizer.kind}\n"
          f"listening on http://{args.host}:{args.port} (/generate, /v1/completions, /v1/chat/completions, "
          "/health, /metrics)", flush=True)
    # The serving loop and the HTTP side share the GIL. Python hands it over every 5 ms by
    # default, so a step finishing on the GPU could wait up to 5 ms for a busy event loop (which
    # streams every running request's tokens); 0.5 ms bounds that wait at a few percent of a step.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server.run(service, args.host, args.port)
    return 0


def add_bench_serving_arguments(p: argparse.ArgumentParser, positive_int, out_dir_arg) -> None:
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server speaking SGLang's /generate (ours or SGLang)")
    p.add_argument("--label", default="bullet", help="names the results file: serving-<label>-<gpu>-<date>.json")
    p.add_argument("--trace", default="uniform", choices=TRACES,
                   help="uniform: inputs 512-1536, outputs 128-384 tokens (the project's standard trace); "
                   "sglang-random: inputs 512-1024, outputs 128-256 (what SGLang's bench_serving draws for the "
                   "offline SGLang README's command); sharegpt and azure-conversation: lengths from published "
                   "statistics (serve/traces.py)")
    p.add_argument("--trace-file", type=existing_file, default=None, metavar="JSONL",
                   help="a JSONL trace (prompt_len, output_len per line) instead of --trace")
    p.add_argument("--rates", type=positive_float, nargs="+", default=[4.0, 8.0, 12.0, 16.0],
                   metavar="REQ_PER_S", help="offered rates (Poisson arrivals), one run each")
    p.add_argument("--extend-to", type=positive_float, default=None, metavar="REQ_PER_S",
                   help="after --rates, keep adding rates one grid step apart (the step between the two highest "
                   "given) while the highest measured rate still meets the TTFT target and the loosest TPOT "
                   "target, up to this rate: no goodput is left as a lower bound ('28+') below it")
    p.add_argument("--num-prompts", type=positive_int, default=200, help="requests per rate")
    p.add_argument("--model", default="llama-3.1-8b", metavar="PRESET",
                   help="the preset whose vocabulary the random prompt ids are drawn from")
    p.add_argument("--ttft-slo-ms", type=positive_float, default=1000.0, help="P90 TTFT target of goodput")
    p.add_argument("--tpot-slo-ms", type=positive_float, nargs="+", default=list(DEFAULT_TPOT_SLOS_MS),
                   help="P90 TPOT targets; goodput is reported for each")
    p.add_argument("--seed", type=int, default=0, help="seeds lengths, arrivals and prompt ids")
    p.add_argument("--out", type=out_dir_arg, default="bench/results", help="folder for the JSON and PNG")
    p.add_argument("--driver", choices=("ours", "sglang"), default="ours",
                   help="who sends the requests: ours (default) or SGLang's own `python -m sglang.bench_serving` "
                   "(one run per rate on its random-ids trace, the lengths of --trace sglang-random; its "
                   "per-request results read back into ours)")
    p.add_argument("--sglang-pythonpath", default=None, metavar="PATH",
                   help="with --driver sglang: where sglang imports (e.g. /tmp/site), for SGLang's process only")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="with --driver sglang: the model directory SGLang's benchmark reads the tokenizer from "
                   "(default: the --model preset's, written to a temporary folder, its prompts made with our "
                   "tokenizer as trained)")
    p.add_argument("--simulate", action="store_true",
                   help="no server: the bullet scheduler's timeline estimated from the latency profile "
                   "(serve/simulate.py); results labelled simulated")
    p.add_argument("--policy-tpot-ms", type=positive_float, default=15.0,
                   help="with --simulate: the TPOT target the SLO policy chooses splits for (bullet serve --tpot-slo-ms)")
    p.add_argument("--policy-tpot-mode", default="step", choices=TPOT_MODES,
                   help="with --simulate: the policy's TPOT mode: every co-running step within the target (step), "
                   "or the target as a per-request mean (average; orchestrate/tpot_budget.py)")
    p.add_argument("--simulate-mode", default="bullet", choices=("bullet", "chunked", "sequential"),
                   help="with --simulate: the scheduler mode simulated (chunked: fused steps costed from the "
                   "profile's prefill and decode times, serve/simulate.py)")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="TOKENS",
                   help="with --simulate: tokens of a fused step (chunked mode, and bullet's fused prompts; "
                   f"default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--prefill-ahead", type=positive_int, default=None, metavar="GROUPS",
                   help="with --simulate in bullet mode: layer groups the scheduler keeps queued on the prefill "
                   "lane (bullet serve --prefill-ahead; default: the scheduler's)")
    p.add_argument("--fuse-prompt-tokens", type=tokens_or_zero, default=0, metavar="N",
                   help="with --simulate in bullet mode: prompts of at most N tokens fused into decode steps "
                   "(bullet serve --fuse-prompt-tokens)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="with --simulate: the latency profile (default: this GPU's, or the shipped H200 one without a GPU)")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="instead of measuring: the goodput table of earlier runs (serving-*.json, .json.xz or .json.gz files)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="with --report: also one plot of every run's P90 TTFT and TPOT against offered rate")


def make_trace_fn(args):
    from . import traces

    if args.trace_file:
        base = traces.load_jsonl(args.trace_file, rate=1.0, seed=args.seed)
        return lambda rate: traces.with_poisson_arrivals(base[: args.num_prompts], rate, args.seed)
    make = {"uniform": traces.uniform_trace, "sglang-random": traces.sglang_random_trace,
            "sharegpt": traces.sharegpt_like_trace,
            "azure-conversation": traces.azure_conversation_trace}[args.trace]
    return lambda rate: make(args.num_prompts, rate, seed=args.seed)


def gpu_monitor(url: str):
    """NVML sampling (SM clock, power) around each rate when the server is on this machine and
    NVML answers; None otherwise (a remote server's GPU is not ours to read)."""
    from urllib.parse import urlparse

    from ..measure import GpuMonitor, nvml_device

    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1") or nvml_device(0)[0] is None:
        return None
    return lambda: GpuMonitor(0, interval_s=0.1)


def next_rate(rows: list[dict], given: list[float], extend_to: float | None, ttft_s: float,
              loosest_tpot_s: float) -> float | None:
    """The rate ``--extend-to`` measures after ``rows`` (in rate order), or None: none asked, the
    highest measured rate already misses the targets (at least 10% of its requests outside the
    TTFT target or the loosest TPOT target), or the next would pass ``extend_to``. The step is the
    gap between the two highest ``given`` rates (a quarter of the rate when one was given)."""
    from .metrics import goodput_by_attainment

    finite = sorted(r for r in given if math.isfinite(r))
    if extend_to is None or not rows or not finite or not math.isfinite(rows[-1]["rate"]):
        return None
    if goodput_by_attainment(rows[-1:], ttft_s, loosest_tpot_s) is None:
        return None
    step = finite[-1] - finite[-2] if len(finite) >= 2 and finite[-1] > finite[-2] else finite[-1] / 4
    nxt = round(rows[-1]["rate"] + step, 6)
    return nxt if nxt <= extend_to + 1e-9 else None


def run_sglang_driver(args, rates: list[float], ttft_s: float, progress) -> list[dict]:
    """Rows measured by SGLang's own benchmark (:mod:`.sglang_driver`), its files kept in a
    temporary folder with the preset's model directory unless --model-dir names one. With the
    preset's, the client makes its prompts with our tokenizer as trained (the standard trace's
    prompts; the server's padded one would turn most random ids into several tokens each)."""
    import tempfile

    from ..models.presets import write_model_dir
    from . import sglang_driver

    with tempfile.TemporaryDirectory(prefix="bullet-sglang-bench-") as tmp:
        if args.model_dir:
            model_dir = tokenizer_dir = args.model_dir
        else:
            model_dir = str(write_model_dir(args.model, Path(tmp) / "model"))
            tokenizer_dir = str(write_model_dir(args.model, Path(tmp) / "client", pad_vocab=False))
        return sglang_driver.run(args.url, rates, args.num_prompts, args.seed, model_dir, tmp,
                                 ttft_s, min(args.tpot_slo_ms) / 1e3, pythonpath=args.sglang_pythonpath,
                                 monitor=gpu_monitor(args.url), progress=progress, tokenizer_dir=tokenizer_dir)


def run_simulation(args, rates: list[float], ttft_s: float, progress) -> tuple[list[dict], dict]:
    """Rows of the simulated bullet scheduler (:mod:`.simulate`) and the facts to record."""
    from ..orchestrate import Estimator, Profile, SLOPolicy
    from ..orchestrate.profile import local_profile
    from ..orchestrate.profiler import DEFAULT_SPLITS
    from . import simulate

    path = args.profile or local_profile(args.model)
    policy = SLOPolicy(Estimator(Profile.load(path)), list(DEFAULT_SPLITS), tpot_ms=args.policy_tpot_ms,
                       ttft_ms=args.ttft_slo_ms, tpot_mode=args.policy_tpot_mode)
    cfg = simulate.SimConfig(chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
                             fuse_prompt_tokens=args.fuse_prompt_tokens,
                             prefill_ahead=args.prefill_ahead or PREFILL_AHEAD)
    rows = simulate.simulate_rates(policy, make_trace_fn(args), rates, ttft_s, min(args.tpot_slo_ms) / 1e3,
                                   cfg=cfg, progress=progress, mode=args.simulate_mode)
    return rows, {"simulated": True, "profile": str(path), "policy_tpot_ms": args.policy_tpot_ms,
                  "policy_tpot_mode": args.policy_tpot_mode,
                  "mode": args.simulate_mode, "chunk_size": cfg.chunk_size, "fuse_prompt_tokens": cfg.fuse_prompt_tokens,
                  "prefill_ahead": cfg.prefill_ahead}


def bench_serving_main(args) -> int:
    if args.plot and not args.report:
        print("bullet bench-serving: error: --plot draws the runs given to --report; give --report FILES too",
              file=sys.stderr)
        return 2
    if args.report:
        from . import report

        docs = report.load(args.report)
        print(report.markdown(report.goodput_rows(docs)) + "\n\n" + report.gpu_markdown(report.gpu_rows(docs)))
        if args.plot:
            print(f"plot: {report.plot(docs, args.plot)}")
        return 0
    from .. import results
    from ..models.presets import preset_config
    from . import loadgen
    from .metrics import goodput

    vocab = preset_config(args.model).vocab_size
    ttft_s = args.ttft_slo_ms / 1e3
    if not args.simulate and (args.simulate_mode != "bullet" or args.fuse_prompt_tokens or args.policy_tpot_mode != "step"
                              or args.prefill_ahead is not None or args.chunk_size is not None):
        print("bullet bench-serving: error: --simulate-mode, --chunk-size, --fuse-prompt-tokens, --policy-tpot-mode "
              "and --prefill-ahead "
              "describe a simulated scheduler; give --simulate too (a measured server has its own, set by bullet "
              "serve)", file=sys.stderr)
        return 2
    if args.simulate and (args.fuse_prompt_tokens or args.prefill_ahead is not None) and args.simulate_mode != "bullet":
        print("bullet bench-serving: error: --fuse-prompt-tokens and --prefill-ahead apply to --simulate-mode bullet",
              file=sys.stderr)
        return 2
    if args.simulate and args.driver != "ours":
        print("bullet bench-serving: error: --simulate sends no requests; leave --driver out", file=sys.stderr)
        return 2
    if args.driver == "sglang" and (args.trace_file or args.trace != "sglang-random"):
        print("bullet bench-serving: error: --driver sglang sends SGLang's own random-ids requests; give "
              "--trace sglang-random (the same lengths), not another trace or --trace-file", file=sys.stderr)
        return 2
    target = (f"SIMULATED {args.simulate_mode} scheduler (policy TPOT {args.policy_tpot_ms:g} ms, "
              f"{args.policy_tpot_mode} mode, no server)" if args.simulate
              else args.url)
    print(f"bullet bench-serving: {target}, trace {args.trace_file or args.trace}, rates {args.rates} req/s, "
          f"{args.num_prompts} requests each{'' if args.simulate else f', sent by {args.driver}'}", flush=True)
    progress = lambda row: print(loadgen.table([row]).splitlines()[-1], flush=True)  # noqa: E731
    extra = {}

    def measure(rates: list[float]) -> list[dict]:
        if args.simulate:
            rows, facts = run_simulation(args, rates, ttft_s, progress)
            extra.update(facts)
            return rows
        if args.driver == "sglang":
            return run_sglang_driver(args, rates, ttft_s, progress)
        return loadgen.sweep(args.url, rates, make_trace_fn(args), vocab, seed=args.seed, ttft_slo_s=ttft_s,
                             tpot_slo_s=min(args.tpot_slo_ms) / 1e3, keep_results=True, progress=progress,
                             monitor=gpu_monitor(args.url))

    rows = measure(sorted(args.rates))
    while (rate := next_rate(rows, args.rates, args.extend_to, ttft_s, max(args.tpot_slo_ms) / 1e3)) is not None:
        rows += measure([rate])
    summary = {f"goodput_tpot_{t:g}ms": goodput(rows, ttft_s, t / 1e3) for t in args.tpot_slo_ms}
    name = f"serving-{args.label}" + ("-simulated" if args.simulate else "")  # a simulation never passes for a run
    path = results.write(name, rows, summary, args.out, compact=True, **extra, url=args.url,
                         trace=args.trace_file or args.trace, driver=args.driver, num_prompts=args.num_prompts,
                         rates=[r["rate"] if math.isfinite(r["rate"]) else "inf" for r in rows],
                         extend_to=args.extend_to, ttft_slo_ms=args.ttft_slo_ms)
    png = loadgen.plot([{k: v for k, v in r.items() if k != "results"} for r in rows], path,
                       f"serving {args.label}{' (SIMULATED)' if args.simulate else ''}: P90 latency vs offered rate")
    print(loadgen.table(rows))
    for key, g in summary.items():
        print(f"{key}: {g['by_attainment']} req/s (>= 90% of requests meet both SLOs), {g['by_percentile']} req/s (P90s)")
    print(f"results: {path}\nplot: {png}")
    return 0
