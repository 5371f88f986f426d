"""SGLang's own load generator as a driver of `bullet bench-serving` (serve/sglang_driver.py), on
CPU: the flags and output keys we rely on exist in the real sglang 0.5.15 source, its
per-request output reads back into our results exactly, and a run goes through a stand-in
module the way it goes through SGLang's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from bullet_kernels.serve import metrics, sglang_driver, traces

WHEELS = Path(__file__).resolve().parents[1] / ".cache" / "sglang"


@pytest.fixture(scope="module")
def sglang_source(tmp_path_factory) -> Path:
    wheels = sorted(WHEELS.glob("sglang-0.5.15-*.whl"))
    assert wheels, f"no sglang 0.5.15 wheel in {WHEELS}: scripts/install.sh downloads it (pip download --no-deps)"
    out = tmp_path_factory.mktemp("sglang-src")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(out, [n for n in z.namelist() if n.startswith("sglang/benchmark/") or n == "sglang/bench_serving.py"])
    return out / "sglang"


def test_what_we_use_of_sglangs_benchmark_is_in_0_5_15(sglang_source):
    serving = (sglang_source / "benchmark" / "serving.py").read_text()
    argv = sglang_driver.bench_serving_argv("http://h:1", 8.0, 10, 0, "/m", "/o.jsonl")
    assert argv[1:3] == ["-m", "sglang.bench_serving"] and (sglang_source / "bench_serving.py").exists()
    for flag in (a for a in argv if a.startswith("--")):
        assert f'"{flag}"' in serving, f"sglang.benchmark.serving has no {flag}"
    for key in sglang_driver.DETAIL_KEYS + ("request_rate", "duration"):
        assert f'"{key}":' in serving, f"SGLang's output has no {key!r}"
    common = (sglang_source / "benchmark" / "datasets" / "common.py").read_text()
    # traces.SGLANG_RANDOM_*: lengths drawn as randint(max(int(len * ratio), 1), len + 1)
    assert "max(int(full_len * range_ratio), 1),\n        full_len + 1," in common
    assert traces.SGLANG_RANDOM_INPUT == (int(1024 * 0.5), 1024) and traces.SGLANG_RANDOM_OUTPUT == (int(256 * 0.5), 256)


def as_sglang_record(results: list[metrics.RequestResult], rate: float, duration: float) -> dict:
    """Our results written the way SGLang's benchmark writes its own (one ITL per chunk)."""
    itls = []
    for r in results:
        chunks = sorted(set(r.token_times_s))
        itls.append([b - a for a, b in zip(chunks, chunks[1:])])
    return {"request_rate": rate, "duration": duration,
            "input_lens": [r.prompt_len for r in results],
            "output_lens": [len(r.token_times_s) if r.ok else 0 for r in results],
            "ttfts": [(r.first_token_s - r.start_s) if r.ok else 0.0 for r in results],
            "itls": itls, "errors": ["" if r.ok else r.error for r in results],
            "generated_texts": [""] * len(results)}


def sample_results() -> list[metrics.RequestResult]:
    def one(first, gaps, chunk_of_last=1):
        times = [first]
        for g in gaps:
            times.append(times[-1] + g)
        times += [times[-1]] * (chunk_of_last - 1)
        return metrics.RequestResult(100, len(times), 0.0, 0.0, first, times, times[-1])

    failed = metrics.RequestResult(50, 8, 0.0, 0.0, None, [], 1.0, ok=False, error="HTTP 503")
    return [one(0.05, [0.010] * 9), one(0.30, [0.012] * 5, chunk_of_last=3), one(1.2, []), failed]


def test_sglangs_per_request_output_reads_back_as_our_results():
    ours = sample_results()
    back = sglang_driver.results_of(as_sglang_record(ours, 4.0, 3.0))
    for a, b in zip(ours, back):
        assert (b.ok, b.output_len if b.ok else 0) == (a.ok, len(a.token_times_s) if a.ok else 0)
        if a.ok:
            assert metrics.ttft_s(b) == pytest.approx(metrics.ttft_s(a))
            assert (metrics.tpot_s(b) or 0) == pytest.approx(metrics.tpot_s(a) or 0)  # (latency - ttft) / (n - 1)
    assert back[3].error == "HTTP 503" and back[3].first_token_s is None
    row = sglang_driver.row_of(as_sglang_record(ours, 4.0, 3.0), ttft_slo_s=1.0, tpot_slo_s=0.011)
    assert (row["rate"], row["n"], row["ok"], row["failed"]) == (4.0, 4, 3, 1)
    # 10 ms and 60 ms / 7 tokens (a last chunk of 3) meet 11 ms; 1.2 s TTFT misses; so does the failure
    assert row["slo_attainment"] == pytest.approx(2 / 4)
    assert row["send_lag_p99_ms"] is None and row["driver"] == "sglang.bench_serving"


def test_requests_sglangs_client_never_timed_are_left_out_of_latency_and_goodput():
    """A request whose stream carried no text comes back successful with TTFT 0 and no ITLs
    (SGLang's client starts the clock at the first chunk with text): counted, not timed."""
    ours = sample_results()
    record = as_sglang_record(ours, 4.0, 3.0)
    for key, value in (("input_lens", 90), ("output_lens", 6), ("ttfts", 0.0), ("itls", []), ("errors", ""),
                       ("generated_texts", "")):
        record[key] = record[key] + [value, value]
    back = sglang_driver.results_of(record)
    assert [sglang_driver.is_untimed(r) for r in back] == [False, False, False, False, True, True]
    row = sglang_driver.row_of(record, ttft_slo_s=1.0, tpot_slo_s=0.011)
    assert (row["n"], row["count"], row["ok"], row["failed"], row["untimed"]) == (6, 6, 5, 1, 2)
    assert row["output_tokens"] == 10 + 8 + 1 + 12 and row["request_throughput"] == pytest.approx(5 / 3.0)
    assert row["slo_attainment"] == pytest.approx(2 / 4) and len(row["results"]) == 4  # as without them
    assert row["ttft_p50_ms"] == pytest.approx(metrics.summarize(ours, 3.0)["ttft_p50_ms"])
    record.update(ttfts=[0.0] * 6, itls=[[]] * 6, errors=[""] * 6, output_lens=[5] * 6)
    with pytest.raises(ValueError, match="no request of this SGLang bench_serving record was timed"):
        sglang_driver.row_of(record, ttft_slo_s=1.0, tpot_slo_s=0.011)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("itls"), "run it with --output-details"),
    (lambda r: r["ttfts"].pop(), "lists differ in length"),
    (lambda r: r.update(request_rate=None), "positive request_rate"),
])
def test_records_we_cannot_read_are_refused(change, message):
    record = as_sglang_record(sample_results(), 4.0, 3.0)
    change(record)
    with pytest.raises(ValueError, match=message):
        sglang_driver.row_of(record, 1.0, 0.02)


# A stand-in for sglang.benchmark.serving: cli_main() parses sys.argv as SGLang's does and appends
# one record per run; IMPORTS counts how often the module was imported (once per client process).
STAND_IN = '''
import argparse, json, os, sys
IMPORTS = globals().get("IMPORTS", 0) + 1

def cli_main():
    p = argparse.ArgumentParser()
    for flag in ("--backend", "--base-url", "--dataset-name", "--random-input-len", "--random-output-len",
                 "--random-range-ratio", "--num-prompts", "--request-rate", "--seed", "--model", "--tokenizer",
                 "--output-file"):
        p.add_argument(flag)
    p.add_argument("--output-details", action="store_true")
    p.add_argument("--disable-tqdm", action="store_true")
    a = p.parse_args()
    if a.model != "/model":  # from the CLI: the client's tokenizer as trained, the model directory's padded
        sizes = [len(json.load(open(os.path.join(d, "tokenizer.json")))["model"]["vocab"]) for d in (a.tokenizer, a.model)]
        if sizes != [4096, 128256]:
            sys.exit("stand-in: tokenizer vocabularies %s" % sizes)
    if float(a.request_rate) > 50:
        sys.exit("stand-in: overloaded")
    if float(a.request_rate) == 13:
        raise ZeroDivisionError("stand-in: a bug")
    if float(a.request_rate) == 5:  # output that could confuse the protocol: no newline, a look-alike marker
        print("@@bullet-sglang-bench not json")
        sys.stderr.write(" 50%|###")
    if float(a.request_rate) == 7:
        import time
        time.sleep(60)
    print("stand-in: running at", a.request_rate, flush=True)
    n = int(a.num_prompts)
    record = {"request_rate": float(a.request_rate), "duration": 2.0, "input_lens": [700] * n, "output_lens": [5] * n,
              "ttfts": [0.1] * n, "itls": [[0.01] * 4] * n, "errors": [""] * n, "generated_texts": [""] * n,
              "pid": os.getpid(), "imports": IMPORTS}
    with open(a.output_file, "a") as f:
        f.write(json.dumps(record) + "\\n")
'''


def stand_in_site(tmp_path: Path) -> Path:
    """A PYTHONPATH folder whose ``sglang.benchmark.serving`` is the stand-in (0.5.15's layout)."""
    site = tmp_path / "site"
    (site / "sglang" / "benchmark").mkdir(parents=True)
    (site / "sglang" / "__init__.py").write_text("")
    (site / "sglang" / "benchmark" / "__init__.py").write_text("")
    (site / "sglang" / "benchmark" / "serving.py").write_text(textwrap.dedent(STAND_IN))
    return site


def test_every_rate_runs_in_one_client_process_on_the_given_pythonpath(tmp_path):
    site = stand_in_site(tmp_path)
    seen = []
    rows = sglang_driver.run("http://127.0.0.1:1", [2.0, 4.0, 8.0], 6, 0, "/model", tmp_path / "work", 1.0, 0.02,
                             pythonpath=str(site), progress=seen.append)
    assert [r["rate"] for r in rows] == [2.0, 4.0, 8.0] == [r["rate"] for r in seen]
    assert all(r["n"] == 6 and r["slo_attainment"] == 1.0 for r in rows)
    assert metrics.goodput(rows, 1.0, 0.02)["by_attainment"] == 8.0
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "work").glob("*.jsonl"))]
    assert len({r["pid"] for r in records}) == 1 and {r["imports"] for r in records} == {1}


@pytest.mark.parametrize("rate, words", [(60.0, "exited with 'stand-in: overloaded'"),
                                         (13.0, "ZeroDivisionError: stand-in: a bug")])
def test_a_run_that_fails_raises_with_its_output_and_the_command_that_repeats_it(tmp_path, rate, words):
    site = stand_in_site(tmp_path)
    with pytest.raises(RuntimeError) as e:
        sglang_driver.run("http://127.0.0.1:1", [2.0, rate], 6, 0, "/model", tmp_path / "work", 1.0, 0.02,
                          pythonpath=str(site))
    assert words in str(e.value) and f"-m sglang.bench_serving --backend sglang" in str(e.value)
    assert f"--request-rate {rate:g}" in str(e.value)
    assert "running at 2.0" not in str(e.value)  # the output shown is the failed run's alone


def test_output_without_a_final_newline_or_like_a_status_line_does_not_confuse_the_protocol(tmp_path):
    rows = sglang_driver.run("http://127.0.0.1:1", [5.0, 6.0], 6, 0, "/model", tmp_path / "work", 1.0, 0.02,
                             pythonpath=str(stand_in_site(tmp_path)))
    assert [r["rate"] for r in rows] == [5.0, 6.0]


def test_a_run_that_never_answers_is_ended_after_its_timeout(tmp_path):
    with sglang_driver.BenchServingClient(pythonpath=str(stand_in_site(tmp_path)), run_timeout_s=3) as client:
        args = sglang_driver.bench_serving_args("http://127.0.0.1:1", 7.0, 6, 0, "/model", str(tmp_path / "o.jsonl"))
        with pytest.raises(RuntimeError, match="no answer from SGLang's benchmark within 3 s"):
            client.run(args)
        with pytest.raises(RuntimeError, match="gone|exited"):  # and it does not take another run
            client.run(args)


def test_a_client_without_sglangs_benchmark_says_so_before_any_run(tmp_path):
    (tmp_path / "site" / "sglang").mkdir(parents=True)  # an sglang without its benchmark, first on the path
    (tmp_path / "site" / "sglang" / "__init__.py").write_text("")
    with pytest.raises(RuntimeError, match="SGLang's benchmark did not start: .*sglang.benchmark.serving"):
        sglang_driver.BenchServingClient(pythonpath=str(tmp_path / "site"))


def test_the_client_process_ends_with_its_caller_and_rejects_malformed_lines(tmp_path):
    with sglang_driver.BenchServingClient(pythonpath=str(stand_in_site(tmp_path))) as client:
        client.proc.stdin.write("{not json}\n")
        client.proc.stdin.flush()
        assert "not a JSON list of strings" in client._status(30)["error"]
        proc = client.proc
    assert proc.poll() == 0


def test_the_sglang_driver_needs_its_own_trace():
    out = subprocess.run([sys.executable, "-m", "bullet_kernels.cli", "bench-serving", "--driver", "sglang",
                          "--trace", "uniform", "--rates", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "give --trace sglang-random" in out.stderr, out.stderr[-2000:]


def test_sglang_random_trace_has_the_lengths_sglang_draws():
    tr = traces.sglang_random_trace(3000, 5.0, seed=2)
    ins, outs = [r.prompt_len for r in tr], [r.output_len for r in tr]
    assert (min(ins), max(ins), min(outs), max(outs)) == (512, 1024, 128, 256)
    assert sum(ins) / len(ins) == pytest.approx(768, rel=0.02) and sum(outs) / len(outs) == pytest.approx(192, rel=0.02)
    assert json.dumps([r.arrival_s for r in tr]) == json.dumps([r.arrival_s for r in traces.sglang_random_trace(3000, 5.0, seed=2)])


def test_bench_serving_with_the_sglang_driver_writes_our_results(tmp_path):
    site = stand_in_site(tmp_path)
    out = subprocess.run([sys.executable, "-m", "bullet_kernels.cli", "bench-serving", "--driver", "sglang",
                          "--trace", "sglang-random", "--rates", "3", "6", "--num-prompts", "5", "--label", "sg",
                          "--url", "http://127.0.0.1:9", "--sglang-pythonpath", str(site), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("serving-sg-*.json")
    doc = json.loads(path.read_text())
    assert doc["driver"] == "sglang" and doc["trace"] == "sglang-random"
    assert [r["rate"] for r in doc["rows"]] == [3.0, 6.0]
    assert doc["summary"]["goodput_tpot_15ms"]["by_attainment"] == 6.0  # 10 ms TPOT, 100 ms TTFT at both rates
    assert "sent by sglang" in out.stdout
