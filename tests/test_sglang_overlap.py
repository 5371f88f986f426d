"""The overlapped pdmux loop (bullet_sglang.overlap) driven on the CPU by a stand-in scheduler
that keeps SGLang's contracts: a decode step's tokens are known only once its result is
processed, a request finished at step k is still in step k+1 (its token skipped, as SGLang's
result processor does with enable_overlap), a prefill is admitted from the waiting queue and
merged after its event. The log of what ran, on which stream, in which order, is checked."""

from __future__ import annotations

import contextlib
import dataclasses
import types

import pytest

from bullet_sglang import overlap


class Stop(Exception):
    pass


class Event:
    """A GPU event whose work ends after ``passes_after`` queries (None: never, within the test)."""

    def __init__(self, name, log, passes_after):
        self.name, self.log, self.passes_after, self.queries = name, log, passes_after, 0

    def query(self):
        self.queries += 1
        self.log.append(("query", self.name))
        return self.passes_after is not None and self.queries >= self.passes_after


class LaunchEvent:
    """The event after the ``n``-th prefill launch: passes once the prefill lane has run ``n``
    launches (it runs ``prefill_speed`` of them in the time of each decode step)."""

    def __init__(self, sched, n):
        self.sched, self.n = sched, n

    def query(self):
        return self.n <= self.sched.prefill_ran


class Stream:
    def __init__(self, name, log, sched):
        self.name, self.log, self.sched = name, log, sched

    def synchronize(self):
        self.log.append(("sync", self.name))

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))

    def record_event(self):
        if self.name.startswith("P"):  # after a prefill launch: done once the lane has run that far
            self.sched.prefill_launched += 1
            return LaunchEvent(self.sched, self.sched.prefill_launched)
        return Event(f"{self.name}-event", self.log, self.sched.step_ends_after)

    def query(self):  # everything issued on it has run (the prefill lane: after lane_idle_after asks)
        self.sched.lane_queries += 1
        idle = self.sched.lane_queries >= self.sched.lane_idle_after
        self.log.append(("lane-idle?", self.name, idle))
        return idle


class Lanes:
    def __init__(self, sched):
        self.sched, self.current = sched, None

    @contextlib.contextmanager
    def on(self, stream, prefill):
        before, self.current = self.current, stream.name
        try:
            yield
        finally:
            self.current = before

    def event(self):
        if self.current.startswith("P"):  # a prefill's copy: done by the time the loop asks
            return Event("prefill-copy_done", self.sched.log, 1)
        return Event("copy_done", self.sched.log, self.sched.step_ends_after)


@dataclasses.dataclass
class Req:
    rid: str
    want: int
    got: int = 0

    def finished(self):
        return self.got >= self.want


class Batch:
    def __init__(self, reqs, prefill=False, grammar=False, penalties=False, custom=False, input_top_logprobs=0):
        self.reqs, self.prefill, self.has_grammar = list(reqs), prefill, grammar
        self.sampling_info = types.SimpleNamespace(penalizer_orchestrator=types.SimpleNamespace(is_required=penalties),
                                                   has_custom_logit_processor=custom)
        self.return_logprob, self.return_hidden_states = bool(input_top_logprobs), False
        self.top_logprobs_nums = [input_top_logprobs] * len(self.reqs) if input_top_logprobs else None
        self.token_ids_logprobs = [None] * len(self.reqs) if input_top_logprobs else None
        self.split_forward_batch = None
        self.enable_overlap = False
        self.extend_num_tokens = 512 * len(self.reqs) if prefill else 0
        self.split_index, self.split_forward_count, self.split_prefill_finished = 0, 0, False

    def is_empty(self):
        return not self.reqs

    def copy(self):
        return Batch(self.reqs)

    def merge_batch(self, other):
        self.reqs += other.reqs


class Result:
    def __init__(self, log, step):
        self.log, self.step, self.copy_done = log, step, None

    def copy_to_cpu(self, return_logprob, return_hidden_states):
        self.log.append(("copy", self.step))


class PrefillResult:
    def __init__(self, sched, layers_done):
        self.sched, self.layers_done, self.copy_done = sched, layers_done, None

    def copy_to_cpu(self, return_logprob, return_hidden_states):
        self.sched.log.append(("copy-prefill", self.sched.lanes.current, self.layers_done))


class Scheduler:
    """The SGLang Scheduler surface the loop uses, with SGLang's overlap-relevant behaviour."""

    def __init__(self, arrivals, iterations, grammar=False, penalties=False, custom=False, step_ends_after=1,
                 input_top_logprobs=0, lane_idle_after=1, prefill_speed=2):
        self.log, self.lanes = [], None
        self.arrivals, self.iterations, self.grammar, self.penalties = dict(arrivals), iterations, grammar, penalties
        self.custom, self.input_top_logprobs = custom, input_top_logprobs
        self.step_ends_after = step_ends_after  # queries until a decode step's event passes
        self.lane_idle_after, self.lane_queries = lane_idle_after, 0  # queries until the prefill lane is idle
        # prefill launches the lane runs in a decode step's time; launched and run so far
        self.prefill_speed, self.prefill_launched, self.prefill_ran = prefill_speed, 0, 0
        self.turn, self.steps = 0, 0
        self.groups = [(Stream(f"P{i}", self.log, self), Stream(f"D{i}", self.log, self)) for i in range(3)]
        self.stream_groups, self.bullet_group = self.groups, 0
        self.sm_counts = [(132, 0), (100, 32), (0, 132)]
        self.split_prefill_batch, self.running_batch, self.waiting_queue = None, Batch([]), []
        self.model_config = types.SimpleNamespace(num_hidden_layers=32)
        self.copy_stream, self.copy_stream_ctx = Stream("copy", self.log, self), contextlib.nullcontext()
        self.request_receiver = types.SimpleNamespace(recv_requests=self.recv)
        self.reqs: dict[str, Req] = {}
        self.landed: list[Batch] = []  # prefill batches whose results were processed

    def recv(self):
        if self.turn == self.iterations:
            raise Stop
        self.turn += 1
        return self.arrivals.get(self.turn, [])

    def process_input_requests(self, reqs):
        for rid, want in reqs:
            self.reqs[rid] = Req(rid, want)
            self.waiting_queue.append(self.reqs[rid])

    def update_split_prefill_batch(self, sm_count):
        if self.split_prefill_batch is not None or not self.waiting_queue:
            return False
        self.log.append(("admit", [r.rid for r in self.waiting_queue], self.lanes.current))
        self.split_prefill_batch = Batch(self.waiting_queue, prefill=True, input_top_logprobs=self.input_top_logprobs)
        self.waiting_queue = []
        return True

    def update_running_batch(self, batch):
        assert batch.enable_overlap  # the loop marks it before SGLang prepares the next step
        if not batch.reqs:
            return batch
        return Batch([r for r in batch.reqs if not r.finished()], grammar=self.grammar, penalties=self.penalties,
                     custom=self.custom)

    def adjust_stream_groups(self):
        self.bullet_group = 1 if self.split_prefill_batch is not None else (2 if not self.running_batch.is_empty() else 0)
        self.log.append(("switch", self.bullet_group))
        return self.bullet_group, self.groups[self.bullet_group]

    def run_batch(self, batch):
        if batch.prefill:
            self.log.append(("prefill", self.lanes.current, batch.split_index, batch.split_forward_count))
            batch.split_forward_batch = "activations"
            assert not batch.split_prefill_finished  # SGLang's contract: set after the last layers' run
            return PrefillResult(self, batch.split_index + batch.split_forward_count)
        self.steps += 1
        self.prefill_ran = min(self.prefill_ran + self.prefill_speed, self.prefill_launched)
        self.log.append(("launch", self.steps, self.lanes.current, [r.rid for r in batch.reqs]))
        return Result(self.log, self.steps)

    def process_batch_result(self, batch, result):
        if batch.prefill:
            assert result.layers_done == 32 and result.copy_done.query()  # the last launch's, copied
            assert batch.split_forward_batch == "activations"
            self.landed.append(batch)
            self.log.append(("processed-prefill", self.lanes.current))
            for r in batch.reqs:
                r.got += 1  # the first token
            return
        self.log.append(("process", result.step, result.copy_done and result.copy_done.name))
        for r in batch.reqs:
            if r.finished():  # SGLang's result processor with enable_overlap: ran one step too many
                continue
            r.got += 1

    def on_idle(self):
        self.log.append(("idle",))


def run(sched):
    sched.lanes = Lanes(sched)
    with pytest.raises(Stop):
        overlap.run(sched, sched.lanes)
    return sched.log


def events(log, *kinds):
    return [e for e in log if e[0] in kinds]



def in_flight_at(log, i):
    """Decode steps launched and not yet processed before ``log[i]``."""
    return {e[1] for e in events(log[:i], "launch")} - {e[1] for e in events(log[:i], "process")}


def prefill_launches(log):
    return [e[2:] for e in events(log, "prefill")]


def launches_per_turn(log, start, end):
    """Prefill launches after each decode launch in ``log[start:end]``."""
    steps = [i for i, e in enumerate(log) if e[0] == "launch" and start < i < end]
    return [len(events(log[a:b], "prefill")) for a, b in zip(steps, steps[1:] + [end])]


def assert_overlapped(log, s, first_step=1):
    """From ``first_step`` on, step k is processed only after k+1 was launched (or k was the
    last), having waited on its copy's event, never on a lane."""
    flow = events(log, "launch", "process")
    for i, e in enumerate(flow):
        if e[0] == "process" and e[1] >= first_step:
            assert e[1] == s.steps or ("launch", e[1] + 1) in [x[:2] for x in flow[:i]]
            assert e[2] == "copy_done"


def test_decode_alone_launches_step_k_plus_1_before_processing_step_k():
    s = Scheduler({1: [("a", 6), ("b", 3)]}, iterations=14)
    log = run(s)
    assert log[0] == ("admit", ["a", "b"], "D0")
    assert prefill_launches(log) == [(0, 32)]  # no decode step waiting: the whole prefill at once
    assert [r.got for r in s.reqs.values()] == [6, 3]  # exactly what was asked: the extra steps' tokens skipped
    assert_overlapped(log, s)
    assert ("copy", 1) in log and ("wait", "copy", "D2") in log
    assert not events(log, "sync")  # the CPU waited only for step copies, never for a lane
    # b finished at its 2nd decode step but was in the 3rd, whose token was skipped; then filtered out
    assert [e[3] for e in events(log, "launch")] == [["a", "b"]] * 3 + [["a"]] * 3  # a: 5 steps and one too many
    assert log[-1] == ("idle",) and ("idle",) not in log[:log.index(("process", 6, "copy_done"))]


def test_group_switches_make_the_new_lanes_wait_for_both_old_ones_on_the_gpu():
    s = Scheduler({1: [("a", 8)], 4: [("c", 3)]}, iterations=20)
    log = run(s)
    switches = [i for i, e in enumerate(log) if e[0] == "switch"]
    # a finishes during c's prefill: the policy is asked again and keeps group 1
    assert [log[i][1] for i in switches] == [1, 2, 1, 1, 2, 0]
    lanes = {0: ("P0", "D0"), 1: ("P1", "D1"), 2: ("P2", "D2")}
    before = lanes[0]
    for i in switches:
        after = lanes[log[i][1]]
        if after == before:  # kept: the two lanes go on side by side, nothing waits
            assert log[i + 1][0] != "wait"
        else:
            assert log[i + 1:i + 5] == [("wait", new, old) for new in after for old in before]
        before = after
    assert not events(log, "sync")


def test_a_prefill_admitted_with_a_step_in_flight_runs_after_it_beside_overlapped_steps():
    s = Scheduler({1: [("a", 20)], 6: [("c", 4)]}, iterations=16, step_ends_after=3)
    log = run(s)
    admit_c = log.index(("admit", ["c"], "D2"))  # made on the decode lane, like all scheduler state
    assert len(in_flight_at(log, admit_c)) == 1  # the admission does not wait on the CPU ...
    assert log[admit_c + 1] == ("wait", "P2", "D2")  # ... the prefill lane waits for it and that step on the GPU
    assert log[admit_c + 2] == ("switch", 1) and ("wait", "P1", "D2") in log[admit_c + 3:admit_c + 7]
    # while c's prefill runs, decode goes on overlapped on the split's decode lane
    landed = log.index(("processed-prefill", "D1"), admit_c)
    # its result copied on its own lane behind its last layers; processed and merged on the decode
    # lane once that copy's event has passed, the decode lane waiting for the prefill lane first
    copied = log.index(("copy-prefill", "P1", 32), admit_c)
    assert log[copied - 1] == ("prefill", "P1", 30, 2)
    assert ("wait", "D1", "P1") in log[copied:landed] and len(in_flight_at(log, landed)) == 1
    during = [e for e in events(log[admit_c:landed], "launch")]
    assert len(during) >= 5 and {e[2] for e in during} == {"D1"}
    assert_overlapped(log, s)
    assert not events(log, "sync")
    # its layers in launches of LAYERS_PER_LAUNCH, in order, all 32 exactly once: 4 in the first
    # turn (the awaited step ends at the 3rd query, the lane has two queued by then), then the
    # two a turn the lane runs in a step's time
    launches = prefill_launches(log)[1:]
    assert [c for _, c in launches] == [overlap.LAYERS_PER_LAUNCH] * 16
    assert [i for i, _ in launches] == list(range(0, 32, 2))
    assert launches_per_turn(log, admit_c, landed) == [4, 2, 2, 2, 2, 2, 2]
    assert s.reqs["c"].got == 4  # its first token from the prefill, 3 decode steps (the 4th skipped)
    assert s.reqs["a"].got == 1 + len(events(log, "process")) < 20  # one per processed step, none lost


@pytest.mark.parametrize("ends_after, speed, per_turn", [
    (1, 2, [2] * 8),  # the awaited step ends at once: two queued on the lane, as many as it runs a step
    (3, 2, [4, 2, 2, 2, 2, 2, 2]),  # it ends at the 3rd query: launches go on until then
    (None, 2, [16]),  # it never ends (the CPU is free): the whole prefill at once
    (1, 0, [2, 0, 0, 0]),  # the lane runs nothing: two queued, no more
])
def test_prefill_layers_go_out_while_the_awaited_step_runs_or_the_prefill_lane_runs_dry(ends_after, speed, per_turn):
    s = Scheduler({1: [("a", 30)], 3: [("c", 2)]}, iterations=40, step_ends_after=ends_after, prefill_speed=speed)
    log = run(s)
    admit_c = log.index(("admit", ["c"], "D2"))
    landed = next((i for i, e in enumerate(log) if e[0] == "processed-prefill" and i > admit_c), len(log))
    assert launches_per_turn(log, admit_c, landed)[:len(per_turn)] == per_turn
    launched = prefill_launches(log)[1:]
    assert s.reqs["c"].got == 2
    if speed:
        assert launched == [(i, 2) for i in range(0, 32, 2)]  # in order, each once
    else:  # the rest went out at once when a's decoding ended and no step was awaited any more
        assert launched == [(0, 2), (2, 2), (4, 28)]
        assert log.index(("prefill", "P1", 4, 28)) > log.index(("process", 30, "copy_done"))


@pytest.mark.parametrize("kind", ["grammar", "penalties", "custom"])
def test_grammar_penalty_and_custom_logit_processor_batches_are_never_overlapped(kind):
    s = Scheduler({1: [("a", 5)], 2: [("c", 2)]}, iterations=12, step_ends_after=2, **{kind: True})
    log = run(s)
    for e in events(log, "process"):
        assert e[2] is None  # processed right after the lane's sync, no copy event
        assert log[log.index(e) - 1][0] == "sync"
    assert not events(log, "copy") and s.reqs["a"].got == 5 and s.reqs["c"].got == 2
    assert s.bullet_overlapped_steps == 0 and s.bullet_decode_steps == 5
    # c's layers still go out while a's step runs (its own event gates them once two are queued)
    first = log.index(("prefill", "P1", 0, 2))
    assert log[first - 1][0] == "launch" and log[first + 1:first + 6] == [
        ("prefill", "P1", 2, 2), ("query", "D1-event"), ("prefill", "P1", 4, 2), ("query", "D1-event"), ("sync", "D1")]


def test_the_loop_counts_overlapped_steps():
    s = Scheduler({1: [("a", 6), ("b", 3)]}, iterations=14)
    run(s)
    assert (s.bullet_overlapped_steps, s.bullet_decode_steps) == (6, 6)


def test_scheduler_state_is_made_and_freed_on_the_decode_lane_only():
    """What the admission and a landed prefill's processing allocate (and free) is the decode
    lane's: a block of the prefill lane's, freed while a queued decode step still reads it, could
    be handed at once to the prefill's next allocation (the caching allocator's rule). Each
    admission is followed by the prefill lane's GPU wait for it, each landing preceded by the
    decode lane's wait for the prefill."""
    s = Scheduler({1: [("a", 30)], 3: [("b", 4)], 8: [("c", 5)], 20: [("d", 3)]}, iterations=40, step_ends_after=2)
    log = run(s)
    admits = [i for i, e in enumerate(log) if e[0] == "admit"]
    landings = [i for i, e in enumerate(log) if e[0] == "processed-prefill"]
    assert len(admits) == len(landings) == 4
    for i in admits:
        lane = log[i][2]
        assert lane.startswith("D") and log[i + 1] == ("wait", "P" + lane[1:], lane)
    for i in landings:
        lane = log[i][1]
        assert lane.startswith("D") and ("wait", lane, "P" + lane[1:]) in log[i - 3:i]
    assert {r.rid: r.got for r in s.reqs.values()} == {"a": s.reqs["a"].got, "b": 4, "c": 5, "d": 3}


def test_a_prefill_reading_input_logprobs_on_the_host_issues_its_last_layers_once_its_lane_is_idle():
    """Input top-k logprobs make SGLang's last prefill run wait on the host for the prefill lane:
    issued with the whole prefill still queued, that wait would hold the decode lane up to a
    whole prefill's time."""
    s = Scheduler({1: [("a", 30)], 3: [("c", 2)]}, iterations=40, step_ends_after=None, input_top_logprobs=5,
                  lane_idle_after=3)
    log = run(s)
    last = log.index(("prefill", "P1", 30, 2))
    asked = [e for e in log[:last] if e[0] == "lane-idle?"]
    assert [e[2] for e in asked] == [False, False, True]  # postponed twice, issued once the lane was idle
    assert prefill_launches(log)[1:] == [(i, 2) for i in range(0, 32, 2)]
    assert s.reqs["c"].got == 2
    # without input logprobs nobody asks
    plain = Scheduler({1: [("a", 30)], 3: [("c", 2)]}, iterations=40, step_ends_after=None)
    assert not events(run(plain), "lane-idle?")


def test_a_landed_prefill_drops_its_forward_state_and_the_loop_reports_a_step_in_flight():
    s = Scheduler({1: [("a", 30)], 3: [("c", 2)]}, iterations=20)
    log = run(s)
    assert len(s.landed) == 2 and all(b.split_forward_batch is None for b in s.landed)
    assert s.bullet_step_in_flight and in_flight_at(log, len(log))  # stopped with a step launched, unprocessed
    done = Scheduler({1: [("a", 3)]}, iterations=12)
    log = run(done)
    assert not done.bullet_step_in_flight and not in_flight_at(log, len(log)) and log[-1] == ("idle",)
