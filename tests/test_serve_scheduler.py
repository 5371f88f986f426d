"""The serving scheduler on the CPU (tiny random Llama, eager): every mode gives the greedy
continuation the runner's own generate() gives, preemption loses nothing, bad requests are
refused before anything is queued, aborted requests give their KV back."""

from __future__ import annotations

import random

import pytest
import torch

from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import ModelRunner
from bullet_kernels.models.presets import random_model
from bullet_kernels.serve.request import BadRequest, Request, SamplingParams
from bullet_kernels.serve.scheduler import MODES, QueueFull, Scheduler, SchedulerConfig


def make_runner(pages=256, max_context=256):
    model = random_model("tiny-llama3", seed=0, dtype=torch.float32, device="cpu", max_context=max_context)
    return ModelRunner(model, EngineConfig(page_size=4, kv_num_pages=pages, max_context=max_context, layer_groups=2,
                                           prefill_max_seqs=64))


PROMPTS = [[(7 * i + j) % 250 + 2 for j in range(n)] for i, n in enumerate((5, 17, 9, 30, 3, 12))]
NEW = [6, 3, 10, 4, 8, 5]


@pytest.fixture(scope="module")
def expected():
    runner = make_runner()
    return [runner.generate([p], n)[0] for p, n in zip(PROMPTS, NEW)]


def run_all(s: Scheduler, reqs, limit=10_000):
    for r in reqs:
        s.add(r)
    steps = 0
    while s.has_work():
        s.step()
        steps += 1
        assert steps < limit, "the scheduler stopped making progress"
    return steps


def requests(**kw):
    return [Request(f"r{i}", list(p), SamplingParams(max_new_tokens=n, **kw)) for i, (p, n) in enumerate(zip(PROMPTS, NEW))]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk,max_running", [(8, 3), (64, 64)])
def test_every_mode_gives_the_greedy_continuation(expected, mode, chunk, max_running, overlap):
    runner = make_runner()
    s = Scheduler(runner, SchedulerConfig(mode=mode, chunk_size=chunk, max_running=max_running, overlap=overlap))
    reqs = requests()
    run_all(s, reqs)
    assert [r.output for r in reqs] == expected
    assert (s.counters["overlapped_decode_steps"] > 0) == overlap
    assert all(r.finish_reason == "length" for r in reqs)
    assert runner.kv_cache.num_free_pages == runner.kv_cache.num_pages, "finished requests must free their KV"


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_a_full_kv_cache_preempts_and_recomputes_without_losing_tokens(mode, overlap):
    prompts = [[(11 * i + j) % 250 + 2 for j in range(4)] for i in range(6)]
    want = [make_runner().generate([p], 40)[0] for p in prompts]
    runner = make_runner(pages=24)  # 96 tokens of KV; the six requests grow to 44 tokens each
    s = Scheduler(runner, SchedulerConfig(mode=mode, chunk_size=16, overlap=overlap))
    reqs = [Request(f"p{i}", list(p), SamplingParams(max_new_tokens=40)) for i, p in enumerate(prompts)]
    run_all(s, reqs)
    assert [r.output for r in reqs] == want
    assert s.counters["preemptions"] > 0, "the cache was meant to run out"
    assert runner.kv_cache.num_free_pages == 24


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("overlap", [False, True])
def test_stop_tokens_and_eos_finish_early(expected, mode, overlap):
    """With overlap, a request that stops computes one wasted row; its tokens and its KV come
    out the same."""
    runner = make_runner()
    stop = expected[2][7]  # first seen at position 7 of this continuation
    assert stop not in expected[2][:7]
    s = Scheduler(runner, SchedulerConfig(mode=mode, eos_token_ids=(expected[0][1],), overlap=overlap))
    a = Request("a", list(PROMPTS[0]), SamplingParams(max_new_tokens=6))
    b = Request("b", list(PROMPTS[2]), SamplingParams(max_new_tokens=10, stop_token_ids=[stop], ignore_eos=True))
    c = Request("c", list(PROMPTS[0]), SamplingParams(max_new_tokens=6, ignore_eos=True))
    run_all(s, [a, b, c])
    assert (s.counters["overlapped_decode_steps"] > 0) == overlap
    assert a.output == expected[0][:2] and a.finish_reason == "stop"
    assert b.output == expected[2][:8] and b.finish_reason == "stop"
    assert c.output == expected[0] and c.finish_reason == "length"
    assert runner.kv_cache.num_free_pages == runner.kv_cache.num_pages


def test_seeded_sampling_repeats_and_differs_from_greedy(expected):
    outs = []
    for _ in range(2):
        s = Scheduler(make_runner(), SchedulerConfig(mode="bullet"))
        r = Request("x", list(PROMPTS[3]), SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7))
        run_all(s, [r])
        outs.append(r.output)
    assert outs[0] == outs[1] and len(outs[0]) == 12
    assert outs[0] != make_runner().generate([PROMPTS[3]], 12)[0]


def test_bad_requests_are_refused_before_queueing():
    s = Scheduler(make_runner(pages=8, max_context=64), SchedulerConfig(max_waiting=1))
    with pytest.raises(BadRequest, match="longer than the context of 64"):
        s.add(Request("long", [5] * 60, SamplingParams(max_new_tokens=10)))
    with pytest.raises(BadRequest, match="KV pages; the cache has 8"):
        s.add(Request("big", [5] * 30, SamplingParams(max_new_tokens=20)))
    with pytest.raises(BadRequest, match="empty"):
        s.add(Request("empty", [], SamplingParams()))
    with pytest.raises(BadRequest, match="outside the vocabulary 0..255"):
        s.add(Request("vocab", [5, 300], SamplingParams(max_new_tokens=1)))
    assert not s.waiting
    s.add(Request("ok", [5, 6], SamplingParams(max_new_tokens=2)))
    with pytest.raises(QueueFull, match="max_waiting 1"):
        s.add(Request("more", [5, 6], SamplingParams(max_new_tokens=2)))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop_token_ids="x")):
        with pytest.raises(BadRequest):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        SchedulerConfig(mode="fast")
    with pytest.raises(ValueError, match="overlap must be True or False"):
        SchedulerConfig(overlap="yes")


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_aborted_requests_free_their_kv_at_the_next_step(mode, overlap):
    """(With overlap, the pages of a request in the decode step in flight come back when that
    step is read, one step later.)"""
    runner = make_runner()
    s = Scheduler(runner, SchedulerConfig(mode=mode, chunk_size=8, overlap=overlap))
    reqs = requests()
    for r in reqs:
        s.add(r)
    for _ in range(4):
        s.step()
    for r in reqs:
        s.abort(r.rid)
    events = s.step()
    while s.has_work():
        events += s.step()
    assert runner.kv_cache.num_free_pages == runner.kv_cache.num_pages
    aborted = [e.request for e in events if e.request.finish_reason == "abort"]
    assert aborted and all(e.finished for e in events if e.request.finish_reason == "abort")


@pytest.mark.parametrize("mode,counter", [("bullet", "prefills"), ("chunked", "mixed_steps"), ("sequential", "prefill_steps")])
def test_prompts_that_arrive_together_share_prefill_steps(mode, counter, expected):
    """Six prompts (76 tokens) added at once fit one prefill (bullet, sequential) or two 64-token
    chunked steps: a step serving one prompt at a time would take six."""
    s = Scheduler(make_runner(), SchedulerConfig(mode=mode, chunk_size=64))
    reqs = requests()
    run_all(s, reqs)
    assert [r.output for r in reqs] == expected
    assert s.counters[counter] <= 2, dict(s.counters)


@pytest.mark.parametrize("mode", MODES)
def test_max_running_counts_the_prompts_being_prefilled(mode, expected):
    s = Scheduler(make_runner(), SchedulerConfig(mode=mode, chunk_size=64, max_running=2))
    reqs = requests()
    for r in reqs:
        s.add(r)
    while s.has_work():
        s.step()
        assert len(s.running) + len(s.prefilling) <= 2, (len(s.running), len(s.prefilling))
    assert [r.output for r in reqs] == expected


@pytest.mark.parametrize("mode,overlap", [("sequential", False), ("bullet", True)])
def test_a_failed_step_finishes_every_request_it_held(mode, overlap):
    runner = make_runner()
    s = Scheduler(runner, SchedulerConfig(mode=mode, overlap=overlap, max_prefill_tokens=8))
    reqs = requests()
    for r in reqs:
        s.add(r)
    for _ in range(3):
        s.step()  # some prefilled and running, others waiting
    assert (s._flight is not None) == overlap  # with overlap, a decode step in flight too
    events = s.fail_all("error: boom")
    assert {e.request.rid for e in events} == {r.rid for r in reqs if r.finish_reason == "error: boom"}
    assert events and all(r.finished for r in reqs)
    assert runner.kv_cache.num_free_pages == runner.kv_cache.num_pages


def test_bullet_keeps_the_split_mid_prefill_unless_decode_needs_more_sms(expected):
    """Changing the split waits for the prefill groups queued on its lane, so mid-prefill only a
    decision giving decode more SMs is taken; the outputs stay the greedy continuation."""
    from bullet_kernels.engine import Placement
    from bullet_kernels.engine.placement import WHOLE_GPU
    from bullet_kernels.partition import SMSplit

    small, large = SMSplit(prefill=100, decode=32), SMSplit(prefill=68, decode=64)
    asked = iter(range(10_000))

    def flip_flop(decode, prefill):  # alternates between the two splits at every decision
        if decode is None or prefill is None:
            return WHOLE_GPU, WHOLE_GPU
        split = small if next(asked) % 2 else large
        return Placement(split, "decode"), Placement(split, "prefill")

    # One prompt per prefill (max_prefill_tokens), so later prompts prefill beside decode steps.
    s = Scheduler(make_runner(), SchedulerConfig(mode="bullet", max_prefill_tokens=8), flip_flop)
    reqs = requests()
    for r in reqs:
        s.add(r)
    used = []
    while s.has_work():
        mid_prefill = s._prefill_step is not None and s._prefill_group > 0
        s.step()
        if mid_prefill and s.last_split.get("decode"):
            used.append(s.last_split["decode"])
    assert used and set(used) == {64}, used  # once it had 64, mid-prefill it never went back to 32
    assert [r.output for r in reqs] == expected


def test_bullet_keeps_the_split_once_every_prefill_group_is_queued():
    """With every layer group queued, changing hands would wait for the whole tail of the
    prefill (a TPOT spike for every running request): the split stays, even where the decision
    gives decode more SMs. Before that, more SMs for decode are taken."""
    from bullet_kernels.engine import Placement
    from bullet_kernels.partition import SMSplit

    s = Scheduler(make_runner(), SchedulerConfig(mode="bullet"))
    more = Placement(SMSplit(prefill=36, decode=96), "decode")
    s._split = {"decode": 64, "prefill": 68}
    s._prefill_group = 1
    assert not s._keep_split(["a prompt"], more)
    s._prefill_group = len(s.runner.groups)
    assert s._keep_split(["a prompt"], more)
    assert not s._keep_split([], more)  # no prefill: any decision is taken


def test_policy_decisions_are_cached_per_rounded_work():
    from bullet_kernels.orchestrate import Estimator, Profile, SLOPolicy, Work, find_profile
    from bullet_kernels.orchestrate.profiler import DEFAULT_SPLITS
    from bullet_kernels.orchestrate.policy import WORK_QUANTUM as CONTEXT_QUANTUM
    from bullet_kernels.serve.app import ServeOptions, placements_from_profile

    profile = Profile.load(find_profile("h200", "llama-3.1-8b"))
    opts = ServeOptions(model="llama-3.1-8b", tpot_slo_ms=10.0)
    placements, splits, groups = placements_from_profile(profile, opts)
    policy = SLOPolicy(Estimator(profile), list(DEFAULT_SPLITS), tpot_ms=10.0, ttft_ms=opts.ttft_slo_ms)
    assert splits == tuple(DEFAULT_SPLITS) and groups == len(Estimator(profile).groups)
    for batch, context, tokens in [(16, 1000, 1024), (40, 1500, 2048), (80, 1500, 2048), (8, 100, 512)]:
        decode_place, prefill_place = placements((batch, context), (tokens, groups))
        rounded = -(-context // CONTEXT_QUANTUM) * CONTEXT_QUANTUM
        want = policy.decide(Work(decode=(batch, rounded), prefill_tokens=tokens, prefill_groups_left=groups,
                                  ttft_left_ms=opts.ttft_slo_ms)).split
        assert decode_place.split == want and prefill_place.split == want
        assert (decode_place.lane, prefill_place.lane) == ("decode", "prefill")
    hits = placements.cache_info().hits
    placements((16, 1000 - CONTEXT_QUANTUM // 2), (1024, groups))  # rounds up to the same work
    assert placements.cache_info().hits == hits + 1
    assert placements((16, 1000), None)[0].split is None  # decode alone: the whole GPU


def test_static_placements_give_the_split_only_while_both_lanes_have_work():
    """``bullet serve --split``: the shape build_service unpacks (placements, splits, groups)."""
    from bullet_kernels.partition import SMSplit
    from bullet_kernels.serve.app import static_placements

    placements, splits, groups = static_placements("prefill=84,decode=48")
    split = SMSplit(prefill=84, decode=48)
    assert splits == (split,) and groups is None
    decode_place, prefill_place = placements((8, 512), (1024, 4))
    assert (decode_place.split, decode_place.lane, prefill_place.split, prefill_place.lane) == (
        split, "decode", split, "prefill")
    assert placements((8, 512), None)[0].split is None and placements(None, (1024, 4))[1].split is None


# -- overlapped decode under staggered arrivals, stops, aborts, preemption and failures ---------

def _staggered(seed: int):
    """12 requests arriving over 30 steps, half with a stop token taken from their own greedy
    continuation, a quarter aborted at some step."""
    rnd = random.Random(seed)
    prompts = [[rnd.randrange(2, 250) for _ in range(rnd.randrange(2, 16))] for _ in range(12)]
    news = [rnd.randrange(1, 16) for _ in prompts]
    full = [make_runner().generate([p], n)[0] for p, n in zip(prompts, news)]
    stops = [[f[rnd.randrange(len(f))]] if rnd.random() < 0.5 else [] for f in full]
    arrive = sorted(rnd.randrange(0, 30) for _ in prompts)
    aborts = {i: rnd.randrange(0, 40) for i in range(len(prompts)) if rnd.random() < 0.25}
    want = []
    for f, stop in zip(full, stops):
        cut = next((k + 1 for k, t in enumerate(f) if t in stop), len(f))
        want.append(f[:cut])
    return prompts, news, stops, arrive, aborts, want


def drive(s: Scheduler, reqs: list, arrive: list, aborts: dict) -> tuple[dict, dict]:
    """Step ``s`` until every request is done: request i added at step ``arrive[i]`` (one the
    queue refuses counts as finished, reason "refused"), aborted at step ``aborts[i]``. Returns
    the tokens and the finished events each request's client got."""
    emitted = {r.rid: [] for r in reqs}
    finished = {r.rid: 0 for r in reqs}
    step = added = 0
    while added < len(reqs) or s.has_work():
        while added < len(reqs) and arrive[added] <= step:
            try:
                s.add(reqs[added])
            except QueueFull:
                reqs[added].finish_reason, finished[reqs[added].rid] = "refused", 1
            added += 1
        for i, at in aborts.items():
            if at == step and i < added:
                s.abort(reqs[i].rid)
        for ev in s.step() if s.has_work() else []:
            emitted[ev.request.rid] += ev.new_tokens
            finished[ev.request.rid] += ev.finished
        step += 1
        assert step < 5000, "the scheduler stopped making progress"
    return emitted, finished


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pages,max_running", [(256, 4), (9, 8)])  # 9 pages: preemptions
@pytest.mark.parametrize("overlap", [False, True])
def test_staggered_requests_get_the_greedy_continuation(seed, mode, pages, max_running, overlap):
    prompts, news, stops, arrive, aborts, want = _staggered(seed)
    runner = make_runner(pages=pages)
    s = Scheduler(runner, SchedulerConfig(mode=mode, chunk_size=8, max_running=max_running, overlap=overlap))
    reqs = [Request(f"q{i}", list(p), SamplingParams(max_new_tokens=n, stop_token_ids=st))
            for i, (p, n, st) in enumerate(zip(prompts, news, stops))]
    emitted, finished = drive(s, reqs, arrive, aborts)
    assert runner.kv_cache.num_free_pages == runner.kv_cache.num_pages, "KV pages leaked"
    assert set(finished.values()) == {1}, finished  # every request finished exactly once
    for r, w in zip(reqs, want):
        assert emitted[r.rid] == r.output, r.rid  # every token reached the client once, in order
        assert r.output == (w[:len(r.output)] if r.finish_reason == "abort" else w), (r.rid, r.finish_reason)
    if mode == "chunked" and overlap:  # fused steps ran behind a step in flight, and in flight themselves
        assert s.counters["overlapped_mixed_steps"] > 0 and s.counters["mixed_steps_in_flight"] > 0, dict(s.counters)


@pytest.mark.parametrize("mode", MODES)
def test_overlap_leaves_sampled_requests_as_they_were(mode):
    """A sampled row needs its logits on the host: once one joins a batch with a decode step in
    flight, that step is read first and the ordinary step runs, so seeded sampling and greedy
    rows give the same tokens with and without overlap. Greedy requests come first, so steps
    are in flight when the sampled ones arrive."""
    def run(overlap):
        rnd = random.Random(5)
        s = Scheduler(make_runner(pages=128), SchedulerConfig(mode=mode, chunk_size=8, max_running=6, overlap=overlap))
        reqs = [Request(f"q{i}", [rnd.randrange(2, 250) for _ in range(rnd.randrange(2, 14))],
                        SamplingParams(max_new_tokens=rnd.randrange(30, 40) if i < 3 else rnd.randrange(8, 20),
                                       **(dict(temperature=0.8, seed=3) if i >= 3 else {})))
                for i in range(8)]
        step = 0
        while step < 400 and (step < 4 * len(reqs) or s.has_work()):
            if step % 4 == 0 and step // 4 < len(reqs):
                s.add(reqs[step // 4])
            if s.has_work():
                s.step()
            step += 1
        assert not s.has_work() and s.runner.kv_cache.num_free_pages == s.runner.kv_cache.num_pages
        return [r.output for r in reqs], s.counters["overlapped_decode_steps"]

    (with_overlap, overlapped), (without, _) = run(True), run(False)
    assert overlapped > 0 and with_overlap == without


@pytest.mark.parametrize("mode", MODES)
def test_overlap_never_reserves_past_the_context(mode):
    """A request ending exactly at the context completes with overlap on (its KV slots, the
    step in flight's included, stay within the context)."""
    runner = make_runner(max_context=64)
    s = Scheduler(runner, SchedulerConfig(mode=mode, overlap=True))
    reqs = [Request("full", [3 + j % 200 for j in range(54)], SamplingParams(max_new_tokens=10)),
            Request("short", [5, 6, 7], SamplingParams(max_new_tokens=20))]
    run_all(s, reqs)
    assert [len(r.output) for r in reqs] == [10, 20] and all(r.finish_reason == "length" for r in reqs)


def test_pages_of_a_stopped_request_wait_for_the_step_in_flight(expected):
    """With overlap, the step after a stop already holds a row for the stopped request: its KV
    pages come back only once that step is read."""
    runner = make_runner()
    kv = runner.kv_cache
    stop = expected[2][7]  # first seen at position 7 of this continuation
    s = Scheduler(runner, SchedulerConfig(mode="bullet", overlap=True))
    a = Request("a", list(PROMPTS[2]), SamplingParams(max_new_tokens=10, stop_token_ids=[stop]))
    b = Request("b", list(PROMPTS[1]), SamplingParams(max_new_tokens=30))
    s.add(a)
    s.add(b)
    while not a.finished:
        s.step()
    assert a.output == expected[2][:8] and s._unread, "a decode step was in flight when a stopped"
    held = sum(len(pages) for pages in s._unread[-1].held)
    assert "a" not in kv and held == -(-(len(PROMPTS[2]) + 8) // kv.page_size)  # all of a's pages...
    assert kv.num_free_pages == kv.num_pages - len(kv.pages("b")) - held  # ...and none of them free yet
    s.step()  # reads the step in flight
    assert "a" not in kv and kv.num_free_pages == kv.num_pages - len(kv.pages("b"))
    run_all(s, [])


def test_a_failed_step_with_a_decode_step_in_flight_loses_no_kv_page():
    """The step read late still holds pages when a launch after it fails: fail_all frees them."""
    from bullet_kernels.engine.step import EagerStep

    runner = make_runner()
    s = Scheduler(runner, SchedulerConfig(mode="bullet", overlap=True))
    s.add(Request("a", list(PROMPTS[0]), SamplingParams(max_new_tokens=30)))
    s.add(Request("b", list(PROMPTS[1]), SamplingParams(max_new_tokens=30)))
    for _ in range(6):
        s.step()
    assert s._unread
    s.abort("a")  # its pages are held by the decode step in flight
    s.add(Request("c", list(PROMPTS[3]), SamplingParams(max_new_tokens=5)))  # a prefill to launch
    original = EagerStep.launch_group

    def failing(self, g, placement=None, stream=None):
        if self.phase == "prefill":
            raise RuntimeError("the prefill lane failed")
        return original(self, g, placement, stream)

    EagerStep.launch_group = failing
    try:
        with pytest.raises(RuntimeError, match="prefill lane failed"):
            s.step()
    finally:
        EagerStep.launch_group = original
    s.fail_all("error: boom")
    assert not s.has_work() and runner.kv_cache.num_free_pages == runner.kv_cache.num_pages


def count_finished(events, finished: dict) -> None:
    for ev in events:
        finished[ev.request.rid] = finished.get(ev.request.rid, 0) + ev.finished


def test_a_step_that_fails_after_finishing_a_request_still_tells_its_client(monkeypatch):
    """The step drains a decode step in flight (request a finishes there, leaving every queue),
    then b's prefill launch raises: the events made before the raise come back from fail_all,
    so a's client hears that a finished, once."""
    from bullet_kernels.engine.step import EagerStep

    s = Scheduler(make_runner(), SchedulerConfig(mode="sequential", overlap=True, chunk_size=64))
    a = Request("a", list(PROMPTS[0]), SamplingParams(max_new_tokens=3))
    s.add(a)
    finished: dict = {}
    while len(a.output) < 2:  # prefill, then a decode step left in flight that makes a's last token
        count_finished(s.step(), finished)
    assert not a.finished
    s.add(Request("b", list(PROMPTS[1]), SamplingParams(max_new_tokens=4)))
    launch = EagerStep.launch_group

    def failing(self, *args, **kwargs):
        if self.phase == "prefill":
            raise RuntimeError("the launch failed")
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(EagerStep, "launch_group", failing)
    with pytest.raises(RuntimeError, match="the launch failed"):
        s.step()
    count_finished(s.fail_all("error: boom"), finished)
    assert a.finish_reason == "length" and finished == {"a": 1, "b": 1}
    assert s.fail_all("shutdown") == []  # nothing is returned twice


@pytest.mark.parametrize("mode, overlap", [("chunked", False), ("bullet", True)])
def test_a_sampling_error_at_join_keeps_the_finished_events_of_that_step(mode, overlap, monkeypatch):
    """A prompt joins in the step where a running request finishes, and sampling the prompt's
    first token raises (torch.multinomial on NaN probabilities, say)."""
    s = Scheduler(make_runner(), SchedulerConfig(mode=mode, overlap=overlap, chunk_size=64))
    a = Request("a", list(PROMPTS[0]), SamplingParams(max_new_tokens=2 if mode == "bullet" else 3))
    s.add(a)
    finished: dict = {}
    while len(a.output) < (1 if overlap else 2):
        count_finished(s.step(), finished)
    s.add(Request("b", list(PROMPTS[1]), SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)))

    def boom(self, req, logits):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    monkeypatch.setattr(Scheduler, "_sample", boom)
    with pytest.raises(RuntimeError, match="probability tensor"):
        for _ in range(4):
            count_finished(s.step(), finished)
    count_finished(s.fail_all("error: boom"), finished)
    assert a.finished and finished.get("a") == 1


# -- a seeded random workload: every mode, with and without overlap ------------------------------

GREEDY_REF: dict = {}


def greedy_reference(prompt: tuple, n: int) -> tuple:
    if "runner" not in GREEDY_REF:
        GREEDY_REF["runner"] = make_runner(pages=1024)
    key = (prompt, n)
    if key not in GREEDY_REF:
        GREEDY_REF[key] = tuple(GREEDY_REF["runner"].generate([list(prompt)], n)[0])
    return GREEDY_REF[key]


def random_workload(seed: int, mode: str, overlap: bool, fuse: int = 0) -> None:
    """Random arrivals, lengths, stop tokens, aborts, tight KV caches, chunk sizes and batch
    limits. Checks: greedy outputs equal plain generation (cut at a stop token, or a prefix when
    aborted); every request gets exactly one finished event and its tokens once; no KV page
    leaks; no page is handed out while a step not yet read may still use it."""
    rnd = random.Random(seed)
    n = rnd.randrange(3, 14)
    prompts = [tuple(rnd.randrange(2, 250) for _ in range(rnd.randrange(1, 24))) for _ in range(n)]
    news = [rnd.choice([1, 1, 2, 3]) if rnd.random() < 0.3 else rnd.randrange(1, 20) for _ in prompts]
    full = [greedy_reference(p, k) for p, k in zip(prompts, news)]
    stops = [[f[rnd.randrange(len(f))]] if rnd.random() < 0.4 else [] for f in full]
    arrive = sorted(rnd.randrange(0, 25) for _ in prompts)
    aborts = {i: rnd.randrange(0, 40) for i in range(n) if rnd.random() < 0.3}
    runner = make_runner(pages=rnd.choice([12, 16, 24, 256]))
    kv = runner.kv_cache
    s = Scheduler(runner, SchedulerConfig(mode=mode, chunk_size=rnd.choice([4, 5, 8, 16, 64]),
                                          max_running=rnd.choice([2, 3, 4, 8]), overlap=overlap,
                                          max_prefill_tokens=rnd.choice([8, 64, 8192]),
                                          fuse_prompt_tokens=fuse))
    in_use: dict = {}  # the pages each planned step reads, kept with its flight

    def watch(plan, rids_of):
        def planned(*args):
            in_use["pages"] = {p for rid in rids_of(*args) for p in kv.pages(rid)}
            return plan(*args)
        return planned

    runner.plan_mixed = watch(runner.plan_mixed, lambda prefill, ids, toks: [r for r, _ in prefill] + list(ids))
    runner.plan_decode = watch(runner.plan_decode, lambda ids, toks: list(ids))
    flight_of = s._flight_of

    def flight_with_pages(rows, logits):
        flight = flight_of(rows, logits)
        flight.pages = in_use["pages"]
        return flight

    s._flight_of = flight_with_pages
    allocate = kv.allocate_many

    def checked_allocate(reqs):
        before = set(kv._free_pages)
        allocate(reqs)
        taken = before - set(kv._free_pages)
        for flight in s._unread:
            assert not taken & flight.pages, "pages handed out while a step not yet read uses them"

    kv.allocate_many = checked_allocate
    if fuse:
        no_lane_prefill_behind_a_fused_step(s)
    reqs = [Request(f"q{i}", list(p), SamplingParams(max_new_tokens=k, stop_token_ids=st))
            for i, (p, k, st) in enumerate(zip(prompts, news, stops))]
    emitted, finished = drive(s, reqs, arrive, aborts)
    assert kv.num_free_pages == kv.num_pages
    assert set(finished.values()) == {1}, finished
    for r, f, st in zip(reqs, full, stops):
        if r.finish_reason == "refused":
            continue
        want = list(f[: next((j + 1 for j, t in enumerate(f) if t in st), len(f))])
        assert emitted[r.rid] == r.output, r.rid
        assert r.output == (want[: len(r.output)] if r.finish_reason == "abort" else want), (r.rid, r.finish_reason)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("overlap", [False, True])
def test_random_workloads_keep_every_promise(mode, overlap):
    for seed in range(10):
        random_workload(seed, mode, overlap)


@pytest.mark.parametrize("overlap", [False, True])
def test_random_workloads_keep_every_promise_with_short_prompts_fused(overlap):
    """bullet with fuse_prompt_tokens: short prompts in fused steps, long ones on the prefill
    lane, switching between them as the queue goes; the same promises."""
    for seed in range(10):
        random_workload(seed, "bullet", overlap, fuse=random.Random(seed).choice([1, 6, 12, 64]))


def no_lane_prefill_behind_a_fused_step(s: Scheduler) -> None:
    """Make ``s`` fail if a lane prefill is prepared while a fused step is not read yet (on a GPU
    its prepare() would fill the prefill graphs' buffers under the running fused step)."""
    start = s._start_prefill

    def checked():
        assert not any(f.fused for f in s._unread), "a lane prefill prepared behind a fused step in flight"
        start()
    s._start_prefill = checked


def test_an_aborted_chunked_prompt_does_not_let_a_lane_prefill_start_behind_its_fused_step(expected):
    s = Scheduler(make_runner(), SchedulerConfig(mode="bullet", fuse_prompt_tokens=10, chunk_size=4, overlap=True))
    no_lane_prefill_behind_a_fused_step(s)
    first = Request("first", list(PROMPTS[0]), SamplingParams(max_new_tokens=NEW[0]))  # 5 tokens: fused
    s.add(first)
    while not first.output:
        s.step()
    short = Request("short", list(PROMPTS[2]), SamplingParams(max_new_tokens=NEW[2]))  # 9 tokens, 3 chunks
    s.add(short)
    while not any(f.fused for f in s._unread):
        s.step()
    assert short in s.prefilling
    s.abort("short")
    long = Request("long", list(PROMPTS[3]), SamplingParams(max_new_tokens=NEW[3]))  # 30 tokens: the lane
    s.add(long)
    while s.has_work():
        s.step()
    assert first.output == expected[0] and long.output == expected[3] and short.finish_reason == "abort"
    assert s.counters["prefills"] == 1
    kv = s.runner.kv_cache
    assert kv.num_free_pages == kv.num_pages


def test_a_short_prompt_does_not_wait_for_room_in_a_fused_step_while_the_lane_idles(expected):
    s = Scheduler(make_runner(), SchedulerConfig(mode="bullet", fuse_prompt_tokens=64, chunk_size=4, overlap=True))
    reqs = [Request(f"r{i}", list(PROMPTS[i]), SamplingParams(max_new_tokens=20)) for i in (0, 4, 2, 5)]
    for r in reqs:  # four running requests fill a 4-token fused step
        s.add(r)
        while not r.output:
            s.step()
    late = Request("late", list(PROMPTS[1]), SamplingParams(max_new_tokens=NEW[1]))
    s.add(late)
    prefills = s.counters["prefills"]
    for _ in range(3):
        s.step()
    assert late.output, "the prompt waited for room in a fused step"
    assert s.counters["prefills"] == prefills + 1  # it went to the prefill lane


@pytest.mark.parametrize("overlap", [False, True])
def test_bullet_fuses_short_prompts_and_sends_long_ones_to_the_prefill_lane(expected, overlap):
    s = Scheduler(make_runner(), SchedulerConfig(mode="bullet", fuse_prompt_tokens=10, chunk_size=16,
                                                 max_prefill_tokens=16, overlap=overlap))
    reqs = requests()  # prompts of 5, 17, 9, 30, 3 and 12 tokens
    run_all(s, reqs)
    assert [r.output for r in reqs] == expected
    assert s.counters["mixed_steps"] > 0 and s.counters["prefills"] > 0, dict(s.counters)
    everything_fused = Scheduler(make_runner(), SchedulerConfig(mode="bullet", fuse_prompt_tokens=64, overlap=overlap))
    reqs = requests()
    run_all(everything_fused, reqs)
    assert [r.output for r in reqs] == expected
    assert everything_fused.counters["prefills"] == 0 and everything_fused.counters["mixed_steps"] > 0


def test_fuse_prompt_tokens_and_prefill_ahead_are_checked():
    with pytest.raises(ValueError, match="prefill_ahead must be an integer >= 1"):
        SchedulerConfig(prefill_ahead=0)
    with pytest.raises(ValueError, match="fuse_prompt_tokens must be an integer >= 0"):
        SchedulerConfig(fuse_prompt_tokens=-1)
    with pytest.raises(ValueError, match="applies to mode bullet"):
        SchedulerConfig(mode="chunked", fuse_prompt_tokens=64)
