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


class Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def synchronize(self):
        self.log.append(("sync", self.name))

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))

    def record_event(self):
        return types.SimpleNamespace(query=lambda: True)


class Lanes:
    def __init__(self, log):
        self.log, self.current = log, None

    @contextlib.contextmanager
    def on(self, stream, prefill):
        before, self.current = self.current, stream.name
        try:
            yield
        finally:
            self.current = before

    def event(self):
        return "copy_done"


@dataclasses.dataclass
class Req:
    rid: str
    want: int
    got: int = 0

    def finished(self):
        return self.got >= self.want


class Batch:
    def __init__(self, reqs, prefill=False, grammar=False, penalties=False):
        self.reqs, self.prefill, self.has_grammar = list(reqs), prefill, grammar
        self.sampling_info = types.SimpleNamespace(penalizer_orchestrator=types.SimpleNamespace(is_required=penalties))
        self.return_logprob = self.return_hidden_states = False
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


class Scheduler:
    """The SGLang Scheduler surface the loop uses, with SGLang's overlap-relevant behaviour."""

    def __init__(self, arrivals, iterations, grammar=False, penalties=False):
        self.log, self.lanes = [], None
        self.arrivals, self.iterations, self.grammar, self.penalties = dict(arrivals), iterations, grammar, penalties
        self.turn, self.steps = 0, 0
        self.groups = [(Stream(f"P{i}", self.log), Stream(f"D{i}", self.log)) for i in range(3)]
        self.stream_groups, self.bullet_group = self.groups, 0
        self.sm_counts = [(132, 0), (100, 32), (0, 132)]
        self.split_prefill_batch, self.running_batch, self.waiting_queue = None, Batch([]), []
        self.model_config = types.SimpleNamespace(num_hidden_layers=32)
        self.pdmux_config = types.SimpleNamespace(split_forward_token_budget=10**9)  # whole prefills a turn
        self.copy_stream, self.copy_stream_ctx = Stream("copy", self.log), contextlib.nullcontext()
        self.request_receiver = types.SimpleNamespace(recv_requests=self.recv)
        self.reqs: dict[str, Req] = {}

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
        self.log.append(("admit", [r.rid for r in self.waiting_queue]))
        self.split_prefill_batch, self.waiting_queue = Batch(self.waiting_queue, prefill=True), []
        return True

    def update_running_batch(self, batch):
        assert batch.enable_overlap  # the loop marks it before SGLang prepares the next step
        if not batch.reqs:
            return batch
        return Batch([r for r in batch.reqs if not r.finished()], grammar=self.grammar, penalties=self.penalties)

    def adjust_stream_groups(self):
        self.bullet_group = 1 if self.split_prefill_batch is not None else (2 if not self.running_batch.is_empty() else 0)
        self.log.append(("switch", self.bullet_group))
        return self.bullet_group, self.groups[self.bullet_group]

    def run_batch(self, batch):
        if batch.prefill:
            self.log.append(("prefill", self.lanes.current, batch.split_forward_count))
            return "prefill-result"
        self.steps += 1
        self.log.append(("launch", self.steps, self.lanes.current, [r.rid for r in batch.reqs]))
        return Result(self.log, self.steps)

    def process_batch_result(self, batch, result):
        if batch.prefill:
            self.log.append(("processed-prefill",))
            for r in batch.reqs:
                r.got += 1  # the first token
            return
        self.log.append(("process", result.step, result.copy_done))
        for r in batch.reqs:
            if r.finished():  # SGLang's result processor with enable_overlap: ran one step too many
                continue
            r.got += 1

    def on_idle(self):
        self.log.append(("idle",))


def run(sched):
    sched.lanes = Lanes(sched.log)
    with pytest.raises(Stop):
        overlap.run(sched, sched.lanes)
    return sched.log


def events(log, *kinds):
    return [e for e in log if e[0] in kinds]


def test_decode_alone_launches_step_k_plus_1_before_processing_step_k():
    s = Scheduler({1: [("a", 6), ("b", 3)]}, iterations=14)
    log = run(s)
    assert log[0] == ("admit", ["a", "b"])
    assert [r.got for r in s.reqs.values()] == [6, 3]  # exactly what was asked: the extra steps' tokens skipped
    flow = events(log, "launch", "process")
    first_overlapped = next(e[1] for e in flow if e[0] == "launch" and e[2] == "D2")
    for i, e in enumerate(flow):
        if e[0] == "process" and e[1] >= first_overlapped:
            assert ("launch", e[1] + 1) in [x[:2] for x in flow[:i]] or e[1] == s.steps  # k+1 launched first
            assert e[2] == "copy_done"  # waited on its copy, not the lane
    assert ("copy", first_overlapped) in log and ("wait", "copy", "D2") in log
    # in steady state (until decode runs dry and the group switches) the CPU never waits for the lane
    start = log.index(("switch", 2))
    end = log.index(("switch", 0), start)
    assert log[end - 2:end] == [("sync", "P2"), ("sync", "D2")]  # the switch's own wait for both lanes
    steady = log[start + 1:end - 2]
    assert ("sync", "D2") not in steady and len(events(steady, "launch")) == 6
    # b finished at its 2nd decode step but was in the 3rd, whose token was skipped; then filtered out
    launches = events(log, "launch")
    assert [e[3] for e in launches] == [["a", "b"]] * 3 + [["a"]] * 3  # a: 5 steps and one too many
    assert log[-1] == ("idle",) and ("idle",) not in log[:log.index(("process", 6, "copy_done"))]


def test_a_prefill_admitted_with_a_step_in_flight_runs_only_after_it():
    s = Scheduler({1: [("a", 20)], 6: [("c", 4)]}, iterations=16)
    log = run(s)
    admit_c = log.index(("admit", ["c"]))
    launched_before = {e[1] for e in events(log[:admit_c], "launch")}
    in_flight = launched_before - {e[1] for e in events(log[:admit_c], "process")}
    assert len(in_flight) == 1  # overlapped until then: the admission itself does not wait on the CPU
    assert log[admit_c - 1] == ("wait", "P2", "D2")  # its prefill-lane work waits for that step on the GPU
    forward = log.index(("prefill", "P1", 32), admit_c)
    assert in_flight <= {e[1] for e in events(log[:forward], "process")}  # processed before the prefill's forward
    assert log[admit_c + 1:admit_c + 5] == [("process", max(in_flight), "copy_done"), ("sync", "P2"), ("sync", "D2"),
                                            ("switch", 1)]
    # while c's prefill runs, decode is on the split and processed at once (pdmux's turn)
    split = log.index(("switch", 1), admit_c)
    step = next(e for e in log[split:] if e[0] == "launch")
    assert step[2] == "D1"
    i = log.index(step)
    assert log[i + 1:i + 4] == [("prefill", "P1", 32), ("sync", "D1"), ("process", step[1], None)]
    # merged, back on the whole GPU, overlapped again; every request got exactly its tokens
    assert ("processed-prefill",) in log and log.count(("switch", 2)) == 2
    assert s.reqs["c"].got == 4  # its first token from the prefill, 3 decode steps (the 4th skipped)
    assert s.reqs["a"].got == 1 + len(events(log, "process")) < 20  # one per processed step, none lost


def test_group_switches_drain_and_wait_for_both_lanes():
    s = Scheduler({1: [("a", 10)]}, iterations=6)
    log = run(s)
    for i, e in enumerate(log):
        if e[0] == "switch" and i >= 2:
            assert log[i - 2][0] == "sync" and log[i - 1][0] == "sync"
            inflight = {x[1] for x in events(log[:i], "launch")} - {x[1] for x in events(log[:i], "process")}
            assert not inflight  # nothing launched and unprocessed across a switch


@pytest.mark.parametrize("kind", ["grammar", "penalties"])
def test_grammar_and_penalty_batches_are_never_overlapped(kind):
    s = Scheduler({1: [("a", 5)]}, iterations=10, **{kind: True})
    log = run(s)
    for e in events(log, "process"):
        assert e[2] is None  # processed right after the lane's sync, no copy event
    assert not events(log, "copy") and s.reqs["a"].got == 5
    assert s.bullet_overlapped_steps == 0 and s.bullet_decode_steps == 4


def test_the_loop_counts_overlapped_steps():
    s = Scheduler({1: [("a", 6), ("b", 3)]}, iterations=14)
    run(s)
    assert (s.bullet_overlapped_steps, s.bullet_decode_steps) == (6, 6)
