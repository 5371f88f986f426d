"""CPU tests of the serving load generator: traces, metrics, goodput, and run_trace against a
tiny SGLang-like server (aiohttp.web on 127.0.0.1, an ephemeral port)."""

from __future__ import annotations

import asyncio
import gzip
import json
import lzma
import math
import random
import statistics

import pytest
from aiohttp import web

from bullet_kernels.serve import loadgen, traces
from bullet_kernels.serve.metrics import (RequestResult, goodput, goodput_by_attainment, goodput_by_p90,
                                          itl_s, slo_attainment, summarize, tpot_s, ttft_s)
from bullet_kernels.serve.traces import TraceRequest

# --------------------------------------------------------------------------------- traces


def test_uniform_trace_lengths_and_poisson_gaps():
    tr = traces.uniform_trace(2000, rate=4.0, seed=1)
    assert len(tr) == 2000
    assert all(512 <= r.prompt_len <= 1536 and 128 <= r.output_len <= 384 for r in tr)
    assert tr[0].arrival_s == 0.0
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(tr, tr[1:])]
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 4.0, rel=0.05)
    assert statistics.fmean(r.prompt_len for r in tr) == pytest.approx(1024, rel=0.05)
    assert statistics.fmean(r.output_len for r in tr) == pytest.approx(256, rel=0.05)


def test_traces_are_seeded_and_rates_share_lengths():
    a, b = traces.uniform_trace(50, 2.0, seed=3), traces.uniform_trace(50, 2.0, seed=3)
    assert a == b
    assert a != traces.uniform_trace(50, 2.0, seed=4)
    fast = traces.uniform_trace(50, 8.0, seed=3)
    assert [(r.prompt_len, r.output_len) for r in fast] == [(r.prompt_len, r.output_len) for r in a]
    assert fast[-1].arrival_s == pytest.approx(a[-1].arrival_s / 4)
    assert {r.arrival_s for r in traces.uniform_trace(20, math.inf)} == {0.0}


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True])
def test_bad_rate_is_refused(bad):
    with pytest.raises(ValueError, match="rate must be > 0"):
        traces.uniform_trace(10, bad)


@pytest.mark.parametrize("make, in_median, out_median", [
    (traces.sharegpt_like_trace, 180, 150),
    (traces.azure_conversation_trace, 1020, 129),
])
def test_lognormal_medians_match_published(make, in_median, out_median):
    tr = make(4000, 1.0, seed=0)
    ins, outs = [r.prompt_len for r in tr], [r.output_len for r in tr]
    assert statistics.median(ins) == pytest.approx(in_median, rel=0.10)
    assert statistics.median(outs) == pytest.approx(out_median, rel=0.10)
    assert 4 <= min(ins) and max(ins) <= 4096 and 4 <= min(outs) and max(outs) <= 2048


def test_sharegpt_means_follow_the_fit():
    tr = traces.sharegpt_like_trace(20000, 1.0, seed=0)
    assert statistics.fmean(r.prompt_len for r in tr) == pytest.approx(256, rel=0.10)
    assert statistics.fmean(r.output_len for r in tr) == pytest.approx(215, rel=0.10)


def test_jsonl_round_trip(tmp_path):
    tr = traces.uniform_trace(25, 3.0, seed=2)
    path = traces.save_jsonl(tr, tmp_path / "t.jsonl")
    assert traces.load_jsonl(path) == tr
    redrawn = traces.load_jsonl(path, rate=6.0, seed=2)
    assert redrawn == traces.with_poisson_arrivals(tr, 6.0, seed=2)


def test_jsonl_missing_arrivals(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt_len": 10, "output_len": 5}\n\n{"prompt_len": 20, "output_len": 6}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1: no arrival_s"):
        traces.load_jsonl(path)
    tr = traces.load_jsonl(path, rate=2.0, seed=0)
    assert [(r.prompt_len, r.output_len) for r in tr] == [(10, 5), (20, 6)]
    assert tr[0].arrival_s == 0.0 and tr[1].arrival_s > 0


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt_len": 3}', "missing output_len"),
    ('{"prompt_len": 3, "output_len": 2, "arrival": 1}', "unknown key"),
    ('{"prompt_len": 0, "output_len": 2, "arrival_s": 0}', "prompt_len must be an int >= 1"),
    ('{"prompt_len": 3, "output_len": 2, "arrival_s": -1}', "arrival_s must be"),
])
def test_jsonl_malformed_line_names_its_number(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_len": 10, "output_len": 5, "arrival_s": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{match}"):
        traces.load_jsonl(path)


def test_prompt_ids_deterministic_and_avoid_bos_eos():
    r = TraceRequest(300, 4, 0.0)
    ids = traces.prompt_ids(r, vocab_size=8, seed=5, index=7)
    assert len(ids) == 300 and set(ids) <= set(range(2, 8)) and set(ids) == set(range(2, 8))
    assert ids == traces.prompt_ids(r, 8, 5, 7)
    assert ids != traces.prompt_ids(r, 8, 5, 8)
    with pytest.raises(ValueError, match="vocab_size"):
        traces.prompt_ids(r, 2, 0, 0)


# -------------------------------------------------------------------------------- metrics


def result(ttft, gaps, start=0.0, ok=True, out=None, arrival=None):
    """A RequestResult sent at ``start`` whose tokens arrive ``ttft`` later, then after ``gaps``."""
    times = [] if ttft is None else [start + ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestResult(prompt_len=100, output_len=out or len(times), arrival_s=start if arrival is None else arrival,
                         start_s=start, first_token_s=times[0] if times else None, token_times_s=times,
                         end_s=times[-1] if times else start + 1, ok=ok, error="" if ok else "HTTP 500: boom")


def test_per_request_metrics():
    r = result(0.5, [0.1, 0.0, 0.2], start=1.0)  # a 2-token chunk at 1.6
    assert ttft_s(r) == pytest.approx(0.5)
    assert tpot_s(r) == pytest.approx(0.3 / 3)
    assert itl_s(r) == pytest.approx([0.1, 0.0, 0.2])
    one = result(0.2, [])
    assert tpot_s(one) is None and itl_s(one) == []
    none = result(None, [], ok=False, out=4)
    assert ttft_s(none) is None and tpot_s(none) is None


def test_summarize_known_answers():
    rs = [result(0.1 * (i + 1), [0.01 * (i + 1)] * 2) for i in range(10)]  # ttft 0.1..1.0, tpot 0.01..0.1
    rs.append(result(None, [], ok=False, out=3))
    s = summarize(rs, duration_s=2.0, ttft_slo_s=0.55, tpot_slo_s=0.055)
    assert (s["count"], s["ok"], s["failed"]) == (11, 10, 1)
    assert s["request_throughput"] == pytest.approx(5.0)
    assert s["output_token_throughput"] == pytest.approx(15.0)
    # linear interpolation between ranks over the 10 successes
    assert s["ttft_p50_ms"] == pytest.approx(550.0)
    assert s["ttft_p90_ms"] == pytest.approx(910.0)
    assert s["ttft_p99_ms"] == pytest.approx(991.0)
    assert s["tpot_p90_ms"] == pytest.approx(91.0)
    assert s["itl_p50_ms"] == pytest.approx(55.0)
    # 5 of 11 meet both SLOs (ttft <= 0.55 and tpot <= 0.055); the failure is a miss
    assert s["slo_attainment"] == pytest.approx(5 / 11)
    assert s["errors"] == ["HTTP 500: boom"]
    assert summarize(rs, 2.0)["slo_attainment"] is None
    assert summarize(rs, 2.0, ttft_slo_s=0.35)["slo_attainment"] == pytest.approx(3 / 11)
    assert summarize([result(None, [], ok=False, out=2)], 1.0)["ttft_p90_ms"] is None


def test_attainment_single_token_and_send_lag():
    assert slo_attainment([result(0.1, []), result(0.1, [0.5])], 1.0, 0.1) == 0.5
    s = summarize([result(0.1, [0.1], start=0.3, arrival=0.0)], 1.0)
    assert s["send_lag_max_ms"] == pytest.approx(300.0)


def row(rate, ttft_p90_s, tpot_p90_s, attainment=None, failed=0, count=100, slos=(0.5, 0.05)):
    return {"rate": rate, "ttft_p90_ms": ttft_p90_s * 1e3, "tpot_p90_ms": tpot_p90_s * 1e3, "count": count,
            "failed": failed, "slo_attainment": attainment, "ttft_slo_s": slos[0], "tpot_slo_s": slos[1]}


def test_goodput_on_rows():
    rows = [row(1, 0.1, 0.02, 1.0), row(2, 0.3, 0.04, 0.95), row(4, 0.6, 0.04, 0.85), row(8, 2.0, 0.2, 0.1)]
    assert goodput_by_p90(rows, 0.5, 0.05) == 2
    assert goodput_by_attainment(rows, 0.5, 0.05) == 2
    assert goodput_by_p90(rows, 1.0, 0.05) == 4
    assert goodput_by_p90(rows, 0.05, 0.05) is None
    assert goodput_by_attainment(rows, 0.5, 0.05, attainment=0.99) == 1
    assert goodput_by_attainment([row(1, 0.1, 0.02, 0.5)], 0.5, 0.05) is None
    g = goodput(rows, 0.5, 0.05)
    assert (g["by_attainment"], g["by_percentile"]) == (2, 2)
    # too many failures: the survivors' P90 alone cannot pass
    assert goodput_by_p90([row(1, 0.1, 0.02, failed=20)], 0.5, 0.05) is None
    with pytest.raises(ValueError, match="summarized with SLOs"):
        goodput_by_attainment(rows, 1.0, 0.05)


def test_goodput_from_raw_results():
    ok = [result(0.1, [0.01] * 3) for _ in range(9)]
    slow = [result(2.0, [0.01] * 3)]
    rows = [{"rate": 1.0, "results": ok + slow},                                   # 90% meet: passes
            {"rate": 2.0, "results": ok[:8] + slow + [result(None, [], ok=False, out=3)]},  # 80%
            {"rate": 3.0, "results": [r.__dict__ for r in ok]}]                    # dict form
    assert goodput_by_attainment(rows, 0.5, 0.05) == 3.0
    assert goodput_by_attainment(rows[:2], 0.5, 0.05) == 1.0
    # the two answers differ here: at rate 2 only 80% meet both SLOs, yet the P90 TTFT of the
    # 9 successes (0.48 s) is within 0.5 s and 10% failed is within the 10% a P90 allows
    assert goodput_by_p90(rows[:2], 0.5, 0.05) == 2.0
    assert goodput_by_p90(rows[:1], 0.28, 0.05) is None  # P90 TTFT interpolates to 0.29 s
    assert goodput_by_p90(rows, 0.5, 0.05) == 3.0


# ------------------------------------------------------------------- run_trace end to end

PROMPTS = web.AppKey("prompts", list)


async def _generate(request: web.Request) -> web.StreamResponse:
    """SGLang-like /generate: one SSE chunk per token with cumulative completion_tokens."""
    body = await request.json()
    assert body["stream"] is True and body["sampling_params"]["ignore_eos"] is True
    assert min(body["input_ids"]) >= 2
    n = body["sampling_params"]["max_new_tokens"]
    request.app[PROMPTS].append(body["input_ids"])
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(1, n + 1):
        await asyncio.sleep(0.005)
        chunk = {"text": "x" * i, "meta_info": {"prompt_tokens": len(body["input_ids"]), "completion_tokens": i}}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _fail(request: web.Request) -> web.Response:
    return web.Response(status=500, text="engine exploded")


async def _short(request: web.Request) -> web.StreamResponse:
    """Two tokens in one chunk, then [DONE], whatever was asked."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"meta_info": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    return resp


async def _serve(coro_fn):
    app = web.Application()
    app[PROMPTS] = []
    app.router.add_post("/generate", _generate)
    app.router.add_post("/broken/generate", _fail)
    app.router.add_post("/short/generate", _short)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await coro_fn(f"http://127.0.0.1:{port}", app)
    finally:
        await runner.cleanup()


def test_run_trace_against_fake_server():
    trace = [TraceRequest(8, 5, 0.0), TraceRequest(12, 3, 0.05), TraceRequest(4, 1, 0.10)]

    async def go(base, app):
        return await loadgen.run_trace(base, trace, vocab_size=1000, seed=9), app[PROMPTS]

    results, prompts = asyncio.run(_serve(go))
    assert [r.ok for r in results] == [True] * 3, [r.error for r in results]
    assert [len(r.token_times_s) for r in results] == [5, 3, 1]
    assert sorted(prompts, key=len) == sorted((traces.prompt_ids(r, 1000, 9, i) for i, r in enumerate(trace)), key=len)
    for req, r in zip(trace, results):
        assert r.start_s >= req.arrival_s - 1e-3 and r.start_s - req.arrival_s < 0.5
        assert r.first_token_s == r.token_times_s[0] and r.token_times_s == sorted(r.token_times_s)
        assert 0.004 < ttft_s(r) < 1.0 and r.end_s >= r.token_times_s[-1]
    assert 0.004 < tpot_s(results[0]) < 0.5
    s = summarize(results, loadgen.duration_of(results))
    assert s["ok"] == 3 and s["output_tokens"] == 9


def test_run_trace_records_failures_instead_of_raising():
    trace = [TraceRequest(8, 4, 0.0), TraceRequest(8, 2, 0.0)]

    async def go(base, app):
        broken = await loadgen.run_trace(base + "/broken", trace, vocab_size=100)
        short = await loadgen.run_trace(base + "/short", trace, vocab_size=100)
        slow = await loadgen.run_trace(base, [TraceRequest(8, 50, 0.0)], vocab_size=100, timeout_s=0.05)
        return broken, short, slow

    broken, short, slow = asyncio.run(_serve(go))
    assert all(not r.ok and r.error == "HTTP 500: engine exploded" for r in broken)
    assert not short[0].ok and "got 2 output tokens, asked for 4" in short[0].error
    assert short[1].ok and short[1].token_times_s[0] == short[1].token_times_s[1]  # one 2-token chunk
    assert not slow[0].ok and slow[0].error.startswith("timeout") and 0 < len(slow[0].token_times_s) < 50
    # nothing listening: a connection error, recorded
    refused = asyncio.run(loadgen.run_trace("http://127.0.0.1:9", trace[:1], vocab_size=100, timeout_s=5))
    assert not refused[0].ok and refused[0].error
    s = summarize(broken + short, 1.0, ttft_slo_s=10.0)
    assert s["failed"] == 3 and s["slo_attainment"] == pytest.approx(0.25)


def test_sweep_table_and_plot(tmp_path):
    def make(rate):
        return traces.uniform_trace(4, rate, input_range=(4, 8), output_range=(2, 4), seed=1)

    async def go(base, app):
        return await asyncio.to_thread(loadgen.sweep, base, [5.0, 50.0], make, vocab_size=100,
                                       ttft_slo_s=1.0, tpot_slo_s=0.1, progress=lambda row: None)

    rows = asyncio.run(_serve(go))
    assert [r["rate"] for r in rows] == [5.0, 50.0]
    assert all(r["ok"] == 4 and r["slo_attainment"] == 1.0 and len(r["results"]) == 4 for r in rows)
    assert goodput(rows, 1.0, 0.1)["by_attainment"] == 50.0
    text = loadgen.table(rows)
    assert "TTFT p90" in text and len(text.splitlines()) == 3
    png = loadgen.plot(rows, tmp_path / "serving")
    assert png.suffix == ".png" and png.stat().st_size > 0
    json.dumps(rows)  # rows are JSON-ready


def test_sweep_without_server_fails_at_warm_up():
    with pytest.raises(RuntimeError, match="warm-up request"):
        loadgen.sweep("http://127.0.0.1:9", [1.0], lambda r: traces.uniform_trace(2, r), vocab_size=100, timeout_s=5)


def test_uniform_trace_random_module_untouched():
    state = random.getstate()
    traces.uniform_trace(10, 1.0)
    assert random.getstate() == state


def test_goodput_report_across_engines(tmp_path):
    """The --report table: per TPOT target each engine's goodput, the best chunked run, and
    bullet's ratio to the best baseline (SGLang included)."""
    from bullet_kernels.serve import report

    def doc(label, goodputs):
        summary = {f"goodput_tpot_{t:g}ms": {"by_attainment": g, "by_percentile": g} for t, g in goodputs.items()}
        text = json.dumps({"benchmark": f"serving-{label}", "summary": summary, "rows": []})
        if label.startswith("sglang"):  # committed runs are kept compressed; the report reads them
            path = tmp_path / f"serving-{label}-h200-20261201.json.gz"
            path.write_bytes(gzip.compress(text.encode()))
        elif label == "chunked512":
            path = tmp_path / f"serving-{label}-h200-20261201.json.xz"
            path.write_bytes(lzma.compress(text.encode()))
        else:
            path = tmp_path / f"serving-{label}-h200-20261201.json"
            path.write_text(text)
        return path

    paths = [doc("bullet", {10: 15.0, 20: 25.0}), doc("sglang-chunk2048", {10: 12.0, 20: 22.0}),
             doc("chunked512", {10: 10.0, 20: 24.0}), doc("chunked1024", {10: 11.0, 20: None}),
             doc("bullet-tpot20", {10: 9.0, 20: 27.0})]
    rows = report.goodput_rows(report.load(paths))
    assert [r["tpot_ms"] for r in rows] == [10.0, 20.0]
    assert rows[0]["chunked-best"] == 11.0 and rows[1]["chunked-best"] == 24.0
    assert rows[0]["bullet-best"] == 15.0 and rows[1]["bullet-best"] == 27.0  # best of the bullet runs
    assert rows[0]["bullet_vs_best_baseline"] == pytest.approx(15 / 12)
    assert rows[1]["bullet_vs_best_baseline"] == pytest.approx(27 / 24)
    table = report.markdown(rows)
    assert "| <= 10 ms | 15 | 12 | 10 | 11 | 9 | 11 | 15 | 1.25 |" in table
    # bullet serving nothing where a baseline serves some load is a ratio of 0, not a blank
    lost = report.goodput_rows(report.load([doc("bullet", {10: None}), doc("sglang-chunk2048", {10: 12.0})]))
    assert lost[0]["bullet-best"] is None and lost[0]["bullet_vs_best_baseline"] == 0.0
    assert "| <= 10 ms | - | 12 | - | - | 0.00 |" in report.markdown(lost)
    # nothing served on either side, or no bullet run at all: no ratio
    assert report.goodput_rows(report.load([doc("bullet", {10: None}), doc("sglang-chunk2048", {10: None})]))[0][
        "bullet_vs_best_baseline"] is None
    assert report.goodput_rows(report.load([doc("sglang-chunk2048", {10: 12.0})]))[0]["bullet_vs_best_baseline"] is None


def test_a_goodput_at_the_top_rate_is_a_lower_bound(tmp_path, capsys):
    """An engine that met the targets at every rate offered might serve more: its goodput
    reads 22+, and bullet's ratio is a bound, or n/a when both sides are at their top."""
    from bullet_kernels.serve import commands, report

    def doc(label, goodputs, top=22.0):
        summary = {f"goodput_tpot_{t:g}ms": {"by_attainment": g, "by_percentile": g} for t, g in goodputs.items()}
        rows = [{"rate": r, "tpot_p90_ms": 5.0 + r, "ttft_p90_ms": 50.0 * r} for r in (6.0, 14.0, top)]
        path = tmp_path / f"serving-{label}-h200-20261201.json"
        path.write_text(json.dumps({"benchmark": f"serving-{label}", "summary": summary, "rows": rows}))
        return path

    paths = [doc("bullet-tpot15", {10: 6.0, 15: 22.0, 20: 22.0, 30: 14.0}),
             doc("sglang-chunk2048", {10: 6.0, 15: 14.0, 20: 22.0, 30: 22.0}),
             doc("chunked512", {10: 6.0, 15: 14.0, 20: 14.0, 30: 22.0})]
    rows = {r["tpot_ms"]: r for r in report.goodput_rows(report.load(paths))}
    assert [rows[t]["ratio_bound"] for t in (10, 15, 20, 30)] == ["=", ">=", "n/a", "<="]
    assert rows[15]["at_top"] == {"bullet-tpot15", "bullet-best"}
    assert rows[30]["at_top"] == {"sglang-chunk2048", "chunked512", "chunked-best"}
    table = report.markdown(list(rows.values()))
    assert "| <= 15 ms | 22+ | 14 | 14 | 14 | 22+ | >= 1.57 |" in table
    assert "| <= 20 ms | 22+ | 22+ | 14 | 14 | 22+ | n/a (both at their top rate) |" in table
    assert "| <= 30 ms | 14 | 22+ | 22+ | 22+ | 14 | <= 0.64 |" in table
    # a tie between an exact goodput and one at its top rate: the bound wins (it is at least as high)
    tie = [doc("bullet-tpot30", {20: 28.0}, top=32.0), doc("sglang-chunk2048", {20: 28.0}, top=32.0),
           doc("chunked512", {20: 28.0}, top=28.0)]
    (row,) = report.goodput_rows(report.load(tie))
    assert row["ratio_bound"] == "<=" and row["at_top"] == {"chunked512", "chunked-best"}
    from bullet_kernels.cli import build_parser

    png = tmp_path / "all.png"
    args = build_parser().parse_args(["bench-serving", "--report", *map(str, paths), "--plot", str(png)])
    assert commands.bench_serving_main(args) == 0
    assert png.stat().st_size > 0 and "22+" in capsys.readouterr().out
    args = build_parser().parse_args(["bench-serving", "--plot", str(png)])
    assert commands.bench_serving_main(args) == 2  # nothing to draw: refused, saying what is missing
    assert "--plot draws the runs given to --report" in capsys.readouterr().err


def test_files_of_one_label_continue_one_sweep(tmp_path):
    """A sweep's higher rates measured in the next device call (same label, same server) join
    the first file's: goodput is recomputed over all rows; mismatched or overlapping files are
    refused with what differs."""
    from bullet_kernels.serve import report

    slo = {"ttft_slo_s": 1.0, "tpot_slo_s": 0.01, "attainment": 0.9, "percentile": 90}

    def doc(name, rates, passing, **meta):
        rows = [{"rate": r, "ttft_p90_ms": 200.0, "tpot_p90_ms": 8.0 if r in passing else 12.0,
                 "slo_attainment": 0.95 if r in passing else 0.5, "ttft_slo_s": 1.0, "tpot_slo_s": 0.01}
                for r in rates]
        best = max(passing & set(rates), default=None)
        summary = {"goodput_tpot_10ms": {**slo, "by_attainment": best, "by_percentile": best}}
        path = tmp_path / name
        path.write_text(json.dumps({"benchmark": "serving-bullet", "device": "NVIDIA H200", "commit": "abc",
                                    "trace": "sglang-random", "num_prompts": 200, "ttft_slo_ms": 1000.0,
                                    "driver": "sglang", "summary": summary, "rows": rows, **meta}))
        return path

    first = doc("a.json", [10.0, 13.0], {10.0, 13.0, 16.0})
    docs = report.load([first, doc("b.json", [16.0, 19.0], {10.0, 13.0, 16.0})])
    assert [r["rate"] for r in docs["bullet"]["rows"]] == [10.0, 13.0, 16.0, 19.0]
    (row,) = report.goodput_rows(docs)
    assert row["bullet"] == 16.0 and row["at_top"] == set()  # 19 failed: an exact goodput, not 13+
    with pytest.raises(ValueError, match="differs in commit"):
        report.load([first, doc("c.json", [16.0], {16.0}, commit="def")])
    other_slo = doc("e.json", [16.0], {16.0})
    text = json.loads(other_slo.read_text())
    text["summary"]["goodput_tpot_10ms"]["ttft_slo_s"] = 2.0
    other_slo.write_text(json.dumps(text))
    with pytest.raises(ValueError, match="differs in goodput targets"):
        report.load([first, other_slo])
    with pytest.raises(ValueError, match=r"rate\(s\) \[13.0\]"):
        report.load([first, doc("d.json", [13.0, 16.0], {16.0})])


def test_gpu_samples_join_the_report(tmp_path):
    from bullet_kernels.serve import report

    gpu = {"sm_clock_mhz": 1755.0, "sm_clock_mhz_min": 1605.0, "power_w": 650.0, "power_w_max": 700.0}
    rows = [{"rate": 8.0, "gpu": gpu}, {"rate": 12.0, "gpu": {"sm_clock_mhz": "unavailable"}}]
    path = tmp_path / "serving-bullet-h200-20261201.json"
    path.write_text(json.dumps({"benchmark": "serving-bullet", "summary": {}, "rows": rows}))
    got = report.gpu_rows(report.load([path]))
    assert got == [{"label": "bullet", "rate": 8.0, **gpu}]  # the unavailable sample is left out
    assert "| bullet | 8 | 1755 (1605) | 650 (700) |" in report.gpu_markdown(got)


def test_sweep_rows_carry_the_monitor_summary():
    class FakeMonitor:  # stands in for GpuMonitor: the sweep only enters it and asks for summary()
        entered = 0

        def __enter__(self):
            FakeMonitor.entered += 1
            return self

        def __exit__(self, *exc):
            return None

        def summary(self):
            return {"sm_clock_mhz": 1980.0}

    def make(rate):
        return traces.uniform_trace(2, rate, input_range=(4, 8), output_range=(2, 3), seed=1)

    async def go(base, app):
        return await asyncio.to_thread(loadgen.sweep, base, [50.0], make, vocab_size=100, keep_results=False,
                                       monitor=FakeMonitor)

    rows = asyncio.run(_serve(go))
    assert FakeMonitor.entered == 1 and rows[0]["gpu"] == {"sm_clock_mhz": 1980.0}
