"""The simulated bullet scheduler (serve/simulate.py) on the shipped H200 profile: exact on a
lone request, every request gets its tokens, the policy's TPOT target holds under load, and
`bullet bench-serving --simulate` writes results marked simulated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bullet_kernels.orchestrate import Estimator, Profile, SLOPolicy
from bullet_kernels.orchestrate.profiler import DEFAULT_SPLITS
from bullet_kernels.serve import simulate, traces
from bullet_kernels.serve.metrics import ttft_s
from bullet_kernels.serve.traces import TraceRequest

PROFILE = Path(__file__).resolve().parents[1] / "graphs/h200/llama-3.1-8b.json"


@pytest.fixture(scope="module")
def estimator():
    return Estimator(Profile.load(PROFILE))


def policy(estimator, tpot_ms):
    return SLOPolicy(estimator, list(DEFAULT_SPLITS), tpot_ms=tpot_ms, ttft_ms=1000)


def test_a_lone_request_costs_what_the_estimator_says(estimator):
    sim = simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig(step_overhead_ms=0.5))
    (r,) = sim.run([TraceRequest(1000, 4, 0.25)])
    whole = estimator.sm_count
    prefill_ms = sum(estimator.prefill_group_ms(1000, g, whole).ms for g in estimator.groups)
    assert ttft_s(r) * 1e3 == pytest.approx(prefill_ms)  # alone: the whole GPU, no decode beside it
    steps = [estimator.decode_ms(1, 1001 + k, whole).ms + 0.5 for k in range(3)]
    assert [round((b - a) * 1e3, 6) for a, b in zip(r.token_times_s, r.token_times_s[1:])] == \
        [round(s, 6) for s in steps]
    assert len(r.token_times_s) == 4 and r.first_token_s == pytest.approx(0.25 + prefill_ms / 1e3)


def test_every_request_gets_its_tokens_in_order(estimator):
    trace = traces.uniform_trace(60, 14.0, seed=3) + [TraceRequest(700, 1, 1.0)]
    results = simulate.BulletSimulation(policy(estimator, 10)).run(trace)
    for req, r in zip(trace, results):
        assert len(r.token_times_s) == req.output_len and r.first_token_s >= req.arrival_s
        assert r.token_times_s == sorted(r.token_times_s)


def test_the_policy_target_holds_as_load_grows_and_ttft_pays(estimator):
    """The 10 ms policy keeps P90 TPOT at its target plus the host's step time while TTFT grows
    (measured on the H200 at 8a99fa6: TPOT p90 9.9-10.2 ms from 14 to 22 req/s, TTFT p90 0.7-1.9 s)."""
    make = lambda rate: traces.uniform_trace(120, rate, seed=0)  # noqa: E731
    rows = simulate.simulate_rates(policy(estimator, 10), make, [10.0, 22.0], 1.0, 0.010)
    assert all(r["simulated"] and r["tpot_p90_ms"] <= 10.5 for r in rows)
    assert rows[1]["ttft_p90_ms"] > 1000 > rows[0]["ttft_p90_ms"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_running must be an int >= 1"):
        simulate.SimConfig(max_running=0)
    with pytest.raises(ValueError, match="step_overhead_ms must be >= 0"):
        simulate.SimConfig(step_overhead_ms=-1)


def test_bench_serving_simulate_writes_results_marked_simulated(tmp_path):
    cmd = [sys.executable, "-m", "bullet_kernels.cli", "bench-serving", "--simulate", "--policy-tpot-ms", "15",
           "--rates", "8", "--num-prompts", "20", "--label", "bullet-tpot15", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SIMULATED" in out.stdout
    (path,) = tmp_path.glob("serving-bullet-tpot15-simulated-*.json")
    doc = json.loads(path.read_text())
    assert doc["simulated"] is True and doc["policy_tpot_ms"] == 15 and doc["profile"].endswith("llama-3.1-8b.json")
    assert doc["policy_tpot_mode"] == "step"
    assert doc["rows"][0]["simulated"] and len(doc["rows"][0]["results"]) == 20
    refused = subprocess.run(cmd[:4] + ["--policy-tpot-mode", "average"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "give --simulate too" in refused.stderr
    refused = subprocess.run(cmd + ["--policy-tpot-mode", "mean"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "invalid choice: 'mean'" in refused.stderr
    refused = subprocess.run(cmd[:5] + ["--driver", "sglang"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--simulate sends no requests" in refused.stderr
    refused = subprocess.run(cmd[:4] + ["--simulate-mode", "chunked"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "give --simulate too" in refused.stderr
    refused = subprocess.run(cmd[:4] + ["--chunk-size", "512"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "give --simulate too" in refused.stderr
    refused = subprocess.run(cmd[:5] + ["--simulate-mode", "chunked", "--fuse-prompt-tokens", "64"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "apply to --simulate-mode bullet" in refused.stderr


def test_the_prefill_first_baseline_and_the_bucket_padding(estimator):
    sim = simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig(step_overhead_ms=0.5))
    (r,) = sim.run_sequential([TraceRequest(1000, 3, 0.0)])
    whole = estimator.sm_count
    prefill_ms = sum(estimator.prefill_group_ms(1000, g, whole).ms for g in estimator.groups)
    assert ttft_s(r) * 1e3 == pytest.approx(prefill_ms + 0.5) and len(r.token_times_s) == 3
    trace = traces.uniform_trace(40, 12.0, seed=1)
    results = sim.run_sequential(trace)
    assert [len(x.token_times_s) for x in results] == [t.output_len for t in trace]
    padded = simulate.SimConfig(pad_prefill=True)
    assert (padded.padded(1000), padded.padded(2048), padded.padded(2049)) == (1024, 2048, 4096)
    assert simulate.SimConfig().padded(1000) == 1000
    (slow,) = simulate.BulletSimulation(policy(estimator, 15), padded).run([TraceRequest(1000, 2, 0.0)])
    assert ttft_s(slow) > ttft_s(sim.run([TraceRequest(1000, 2, 0.0)])[0])  # 1024 tokens cost more than 1000
    with pytest.raises(ValueError, match="one of the modes bullet, sequential, chunked"):
        simulate.simulate_rates(policy(estimator, 15), lambda rate: trace, [1.0], 1.0, 0.01, mode="fast")


def test_chunked_prefill_and_fused_short_prompts(estimator):
    """A fused step costs its chunk's prefill on the whole GPU (at least the weights' read) and
    its decode rows' step; a prompt longer than a chunk takes several steps;
    bullet with fuse_prompt_tokens fuses the short prompts and puts the long ones on the lane."""
    cfg = simulate.SimConfig(chunk_size=512, step_overhead_ms=0.0)
    sim = simulate.BulletSimulation(policy(estimator, 15), cfg)
    whole = estimator.sm_count
    (one,) = sim.run_chunked([TraceRequest(1000, 2, 0.0)])  # 512 + 488 tokens: two fused steps
    two_steps = estimator.prefill_ms(512, whole).ms + estimator.prefill_ms(488, whole).ms
    assert ttft_s(one) * 1e3 == pytest.approx(two_steps)
    floor = sim._weights_ms
    assert sim._mixed_ms(16, 0, 0) == pytest.approx(floor)  # a tiny chunk still reads the weights
    decode = sim._decode_ms(64, 2048, None, False)
    assert sim._mixed_ms(400, 64, 2048) == pytest.approx(estimator.prefill_ms(400, whole).ms + decode)
    trace = traces.sharegpt_like_trace(60, 20.0, seed=2)
    for results in (sim.run_chunked(trace),
                    simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig(fuse_prompt_tokens=300)).run(trace)):
        assert [len(x.token_times_s) for x in results] == [t.output_len for t in trace]
        assert all(x.first_token_s >= x.arrival_s for x in results)
    # every prompt fused, and the decode batch never as large as a chunk: bullet is chunked prefill
    everything_fused = simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig(fuse_prompt_tokens=10**6))
    chunked = simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig())
    assert [x.token_times_s for x in everything_fused.run(trace)] == [x.token_times_s for x in chunked.run_chunked(trace)]
    with pytest.raises(ValueError, match="fuse_prompt_tokens must be an int >= 0"):
        simulate.SimConfig(fuse_prompt_tokens=-1)
    with pytest.raises(ValueError, match="prefill_ahead must be None .* or an int >= 1"):
        simulate.SimConfig(prefill_ahead=0)


def test_a_full_decode_batch_admits_no_prefill(estimator):
    """With max_running requests decoding, the waiting prompts wait: no prefill (and no split
    for one) until a request finishes, so the decode steps run alone on the whole GPU."""
    sim = simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig(max_running=1, step_overhead_ms=0.0))
    first, *_ = sim.run([TraceRequest(512, 20, 0.0), TraceRequest(512, 5, 0.0), TraceRequest(512, 5, 0.0)])
    times = first.token_times_s
    for k in range(1, len(times)):  # token k comes one whole-GPU decode step at context 512 + k after k - 1
        assert (times[k] - times[k - 1]) * 1e3 == pytest.approx(sim._decode_ms(1, 512 + k, None, False)), k


def test_extend_to_keeps_adding_rates_while_the_top_one_meets_the_targets(tmp_path):
    """--extend-to: past --rates, one grid step at a time, while the highest rate measured still
    meets the TTFT and the loosest TPOT target; the rates measured are recorded."""
    cmd = [sys.executable, "-m", "bullet_kernels.cli", "bench-serving", "--simulate", "--policy-tpot-ms", "30",
           "--rates", "2", "4", "--extend-to", "9", "--num-prompts", "10", "--label", "ext", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("serving-ext-simulated-*.json")
    doc = json.loads(path.read_text())
    assert [r["rate"] for r in doc["rows"]] == [2.0, 4.0, 6.0, 8.0]  # 10 would pass 9
    assert doc["rates"] == [2.0, 4.0, 6.0, 8.0] and doc["extend_to"] == 9.0


def test_next_rate_stops_where_the_top_rate_misses_or_the_limit_is_reached():
    from bullet_kernels.serve.commands import next_rate

    def row(rate, attainment):  # a summarized row, as summarize() writes it for these SLOs
        return {"rate": rate, "slo_attainment": attainment, "ttft_slo_s": 1.0, "tpot_slo_s": 0.03}

    assert next_rate([row(8, 1.0), row(11, 0.95)], [8, 11], 20, 1.0, 0.03) == 14  # the grid's last step
    assert next_rate([row(8, 1.0), row(11, 0.85)], [8, 11], 20, 1.0, 0.03) is None  # the top misses
    assert next_rate([row(8, 1.0), row(11, 1.0)], [8, 11], 13.9, 1.0, 0.03) is None  # 14 would pass the limit
    assert next_rate([row(8, 1.0), row(11, 1.0)], [8, 11], None, 1.0, 0.03) is None  # not asked
    assert next_rate([row(8, 1.0)], [8], 20, 1.0, 0.03) == 10  # one rate given: a quarter of it
    assert next_rate([row(float("inf"), 1.0)], [float("inf")], 20, 1.0, 0.03) is None


def test_the_prefill_lane_runs_only_the_groups_queued_on_it_each_step(estimator):
    """The scheduler tops up PREFILL_AHEAD layer groups once a step: a short prompt's groups,
    each far shorter than a decode step, take one step per PREFILL_AHEAD groups."""
    trace = [TraceRequest(512, 60, 0.0), TraceRequest(64, 2, 0.2)]  # a prompt arrives mid-decode
    groups = len(estimator.groups)

    def steps_to_first_token(ahead):
        sim = simulate.BulletSimulation(policy(estimator, 15), simulate.SimConfig(prefill_ahead=ahead))
        decoding, short = sim.run(trace)
        return sum(trace[1].arrival_s < t <= short.first_token_s for t in decoding.token_times_s)

    assert steps_to_first_token(None) <= 2  # the lane never waits: it lands within a step or two
    assert steps_to_first_token(2) >= groups // 2  # two groups a step
    assert steps_to_first_token(4) >= groups // 4
    assert steps_to_first_token(2) > steps_to_first_token(4) > steps_to_first_token(None)


def test_average_tpot_mode_trades_tpot_for_ttft_in_the_simulation(estimator):
    """Simulated, the standard random trace at 19 and 22 req/s, policy 10 ms: holding the mean
    instead of every step gives prefill more SMs (lower TTFT) and lets TPOT rise toward the target
    (its P90 above step mode's); the share of co-running steps is fed each step and reset each run."""
    make = lambda rate: traces.sglang_random_trace(300, rate, seed=0)  # noqa: E731
    step = simulate.simulate_rates(policy(estimator, 10), make, [19.0, 22.0], 1.0, 0.010)
    average_policy = SLOPolicy(estimator, list(DEFAULT_SPLITS), tpot_ms=10, ttft_ms=1000, tpot_mode="average")
    average = simulate.simulate_rates(average_policy, make, [19.0, 22.0], 1.0, 0.010)
    for s, a in zip(step, average):
        assert a["ttft_p90_ms"] < s["ttft_p90_ms"] and a["tpot_p90_ms"] > s["tpot_p90_ms"]
    corun, steps = average_policy.corun_share.counts()
    assert 0 < corun < steps  # fed from the last run only (a window of its last steps)
