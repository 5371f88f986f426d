"""pdmux's loop with SGLang's CPU/GPU overlap for decode steps, a prefill's layers issued in the
CPU's slack, and group switches as GPU waits (the default; ``--bullet-overlap off`` keeps pdmux's
own loop).

Why: SGLang's PD-multiplexing loop waits for every decode step before it processes the result
and prepares the next, so the scheduler's CPU work per step (about 2 ms at batch 10-20 on the
H200) is added to every token; SGLang's own overlap scheduler hides it (decode steps 6.9 ms with
it, 8.8 ms without, docs/sglang-adapter.md). pdmux cannot use that scheduler: SGLang refuses the
two together, its overlap branch of ``run_batch`` would take split prefills down the wrong path,
and it runs every forward on one plain stream, outside our lanes. Overlapping only while no
prefill ran (this loop's first version) brought the steps at batch 0-9 from 7.2 to 5.2 ms, but
each prefill issued whole in one turn held the CPU 10-25 ms, that much added to the decode step
beside it (H200, 9182cc2).

What this loop does instead, in SGLang 0.5.15's terms:
- SGLang's ``enable_overlap`` stays off, so ``run_batch`` keeps its split-prefill and non-overlap
  decode paths, which already pass the sampled tokens to the next step on the GPU (SGLang's
  ``FutureMap``): step k+1 never needs step k's tokens on the CPU.
- The decode lane's stream does the scheduling and the forward, so step k+1's preparation queues
  behind step k on that stream.
- Each decode step's result is copied to pinned host memory on SGLang's copy stream with a
  ``copy_done`` event (what its overlap branch does), and step k is processed after step k+1 is
  launched: the CPU waits only for step k's copy, with k+1 queued. This holds with or without a
  prefill in flight.
- Requests that finished (or were retracted) at step k already ran in step k+1; SGLang's result
  processor skips them when its ``enable_overlap`` is set, which the scheduler sets (its
  ``batch_result_processor`` is replaced with that flag on), and the running batch is marked
  ``enable_overlap`` so ``prepare_for_decode`` makes new sequence-length tensors instead of
  changing the ones an unprocessed step's snapshot holds.
- A prefill's layers are issued between launching step k+1 and processing step k, a few at a
  time until step k has ended (its event), and after that only while fewer than two launches are
  still queued on the prefill lane: the CPU's slack feeds the prefill lane, the lane does not run
  dry, and the decode lane never waits for a whole prefill's launch (:func:`launch_prefill`).
  With no decode running, the whole prefill goes at once.
- All scheduler state is made (and freed) on the decode lane's stream: the admission, a landed
  prefill's result processing and its merge run there; the prefill lane allocates only what its
  forward uses. Why: PyTorch's caching allocator hands a freed block to the next allocation on
  the stream that allocated it, with no wait for other streams' queued reads. A prefill-lane
  tensor that became decode state (a batch admitted on that lane, the sampling parameters its
  merge concatenates) and was then replaced while a queued decode step still read it could be
  overwritten by the prefill's next allocation. (Pipelining decode beside a prefill made this
  reachable; found by review before the GPU run.)
- After an admission the prefill lane waits on the GPU for the decode lane (``wait_stream``):
  the prefill's forward runs after the admission's copies and after the step in flight (its KV
  slots and request rows may be ones a finished request's last step still writes). (A CPU drain
  whenever requests wait would also stop the overlap under saturation, when waiting requests
  cannot be admitted, and SGLang moves grammar-ready requests into its queue inside the admission
  itself, after any check here.)
- A prefill's result is copied to the host on its own lane behind its last layers, with a
  ``copy_done`` event; once that event has passed, the decode lane waits for the prefill lane on
  the GPU (its first tokens were relayed there) and processes and merges it without blocking on
  the decode step in flight (SGLang's prefill processing waits on ``copy_done`` when one is set).
- A group switch (an admission, a landed prefill, decode running dry) makes the new group's two
  streams wait on the GPU for both of the old group's (:func:`switch_groups`): no two groups'
  kernels share SMs, and the CPU goes on; pdmux synchronizes both lanes there. A landed prefill
  is merged while the step in flight stays unprocessed, as SGLang's overlap merges its last
  prefill (the step's snapshot does not hold the new requests).
- Each split ``run_batch`` also gathers the batch's input ids from SGLang's ``FutureMap`` (only
  the first call's are used): a few tiny kernels per launch, which pdmux's own loop pays too.
- Not overlapped: grammar batches (their vocabulary mask needs the previous token) and batches
  with penalties (``prepare_for_decode`` counts each request's last processed token into the
  penalizers; at every change between overlapped and processed-at-once steps one token would be
  counted twice and another never, where SGLang's own overlap is consistently one step late).
  Their steps are processed at once; a prefill's layers are still issued while they run. Nor
  batches with custom logit processors (SGLang's ``filter_batch`` reads their mask on the host,
  a wait for the step in flight every step).
- A prefill asking for input top-k or token-id logprobs reads them to the host in its last run;
  that run is issued only once the prefill lane is idle, so the CPU waits for two layers, not a
  whole prefill. A landed prefill's forward state (``split_forward_batch``: its activations) is
  dropped; the batch would otherwise keep it for as long as it is the running batch.
- The scheduler is not idle (``is_fully_idle``, which ``/flush_cache`` asks) while a split
  prefill or an unprocessed step is in flight.

Tensor parallel size is 1 (the adapter refuses more), so a landed prefill needs no all-reduce of
its event flag as pdmux's loop does.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Callable


class Lanes:
    """The GPU side of the loop, replaced by stand-ins in CPU tests."""

    def __init__(self, set_pdmux_status: Callable[[bool], None]):
        import torch  # here, not at import: the adapter's CPU tests import this module without CUDA work

        self.set_pdmux_status, self.cuda = set_pdmux_status, torch.cuda

    @contextlib.contextmanager
    def on(self, stream, prefill: bool):
        """Work issued inside runs on ``stream``, with SGLang's prefill-or-decode flag set."""
        with self.cuda.stream(stream):
            self.set_pdmux_status(prefill)
            yield

    def event(self):
        return self.cuda.Event()


def overlappable(batch) -> bool:
    """Whether decode steps of ``batch`` may be processed one step late (see the module's notes;
    custom logit processors: SGLang's ``filter_batch`` reads their mask on the host, a wait for
    the step in flight every step)."""
    info = batch.sampling_info
    return not batch.has_grammar and not info.penalizer_orchestrator.is_required and not info.has_custom_logit_processor


def syncs_on_last_layers(batch) -> bool:
    """Whether the prefill's last run waits on the host for its lane: SGLang reads input top-k and
    token-id logprobs to the host there (``.tolist()`` in its logits processor)."""
    if not batch.return_logprob:
        return False
    return (any(n > 0 for n in batch.top_logprobs_nums or ())
            or any(ids is not None for ids in batch.token_ids_logprobs or ()))


#: Layers per prefill launch while a decode step waits to be processed: small, so the CPU turns
#: back to the decode lane within about one launch of the step it waits for (a layer's eager
#: forward is some tens of kernels, well under a millisecond of CPU).
LAYERS_PER_LAUNCH = 2
#: Launches kept queued on the prefill lane even once the awaited decode step has ended: the
#: prefill lane must not run dry while the CPU turns to decode (two launches, four layers, are
#: some milliseconds of a thousand-token prefill on a split's prefill lane).
LAUNCHES_AHEAD = 2


def launch_prefill(s, batch, gate, stream, queued: collections.deque) -> object:
    """Issue the split prefill's next layers on ``stream``, the current one; returns the last
    ``run_batch`` result (None if none ran), the prefill's result once all layers are issued.
    ``queued`` holds the events of this prefill's launches that may still be running (kept by the
    caller from turn to turn).

    With no decode step waiting (``gate`` None) all its layers go at once. Otherwise they go
    :data:`LAYERS_PER_LAUNCH` at a time while ``gate`` (the event of the decode step whose end the
    CPU must answer: processing it and launching the next) has not passed, and after that only
    while fewer than :data:`LAUNCHES_AHEAD` launches are still queued on the lane. Why: issuing a
    whole prefill (a thousand tokens, 32 layers, eager) holds the CPU for 10-25 ms on the H200,
    measured as that much added to the decode step beside it; issuing only in the CPU's slack could
    leave the prefill lane idle. A last run that waits on the host for the lane
    (:func:`syncs_on_last_layers`) is issued only once the lane has run everything before it, so
    that wait is for its own layers, not the whole prefill."""
    layers = s.model_config.num_hidden_layers
    result = None
    while batch.split_index < layers:
        while queued and queued[0].query():
            queued.popleft()
        if gate is not None and len(queued) >= LAUNCHES_AHEAD and gate.query():
            break
        upto = layers if gate is None else min(batch.split_index + LAYERS_PER_LAUNCH, layers)
        if upto == layers and gate is not None and syncs_on_last_layers(batch) and not stream.query():
            break
        batch.split_forward_count = upto - batch.split_index
        result = s.run_batch(batch)
        if upto == layers:
            batch.split_prefill_finished = True  # SGLang's contract: set after the last layers' run
        batch.split_index = upto
        queued.append(stream.record_event())
    return result


def switch_groups(s, lanes_now):
    """The policy's group for what runs now; the new group's streams wait on the GPU for both of
    the old group's, so no two groups' work shares SMs and the CPU does not wait (pdmux's loop
    synchronizes both lanes here). The group kept: no wait (the lanes go on side by side)."""
    _, lanes_next = s.adjust_stream_groups()
    if tuple(lanes_next) == tuple(lanes_now):
        return lanes_now
    for stream in lanes_next:
        for before in lanes_now:
            if stream is not before:
                stream.wait_stream(before)
    return lanes_next


def run(s, lanes: Lanes) -> None:
    """The loop, on scheduler ``s`` (our subclass of SGLang's Scheduler); never returns. Counts the
    decode steps it ran and how many were overlapped in ``s.bullet_decode_steps`` and
    ``s.bullet_overlapped_steps`` (logged at group switches)."""
    s.bullet_decode_steps = s.bullet_overlapped_steps = 0
    s.bullet_step_in_flight = False  # an unprocessed step: the scheduler is not idle (is_fully_idle)
    pending = None  # (snapshot, result) of the decode step launched last and not yet processed
    prefill_result = None
    prefill_enqueued = False  # all its layers and its result's copy are on the prefill lane
    prefill_queued = collections.deque()  # events of its launches that may still be running
    adjust = False
    prefill_stream, decode_stream = s.stream_groups[s.bullet_group]

    def drain():
        nonlocal pending
        if pending is not None:
            with lanes.on(decode_stream, False):
                s.process_batch_result(*pending)  # waits for that step's copy only
            pending = None
            s.bullet_step_in_flight = False

    while True:
        with lanes.on(decode_stream, False):
            s.process_input_requests(s.request_receiver.recv_requests())

        if s.split_prefill_batch is None:  # SGLang admits one prefill at a time
            with lanes.on(decode_stream, True):  # scheduler state is made on the decode lane only
                admitted = s.update_split_prefill_batch(s.sm_counts[s.bullet_group][0])
            if admitted:  # its forward after the admission's copies and the step in flight
                prefill_stream.wait_stream(decode_stream)
                adjust = True

        with lanes.on(decode_stream, False):
            if s.running_batch is not None:
                s.running_batch.enable_overlap = True  # new seq-len tensors: snapshots stay as launched
            s.running_batch = s.update_running_batch(s.running_batch)
            adjust = adjust or (s.bullet_group > 0 and s.running_batch.is_empty())
            if s.running_batch.is_empty() and s.split_prefill_batch is None and pending is None:
                s.on_idle()

        if adjust:
            prefill_stream, decode_stream = switch_groups(s, (prefill_stream, decode_stream))
            adjust = False

        decode = s.running_batch if s.running_batch is not None and not s.running_batch.is_empty() else None
        overlap = decode is not None and overlappable(decode)
        if not overlap:
            drain()
        launched = decode_result = gate = None
        if decode is not None:
            s.bullet_decode_steps += 1
            s.bullet_overlapped_steps += overlap
            with lanes.on(decode_stream, False):
                decode_result = s.run_batch(decode)
                if overlap:  # the result's copy to the host, off the lane, with an event to wait on
                    decode_result.copy_done = lanes.event()
                    s.copy_stream.wait_stream(decode_stream)
                    with s.copy_stream_ctx:
                        decode_result.copy_to_cpu(return_logprob=decode.return_logprob,
                                                  return_hidden_states=decode.return_hidden_states)
                    launched = (decode.copy(), decode_result)
                    # the CPU is next needed when the step before this one ends (this one then runs)
                    gate = (pending or launched)[1].copy_done
                else:
                    gate = decode_stream.record_event()

        batch = s.split_prefill_batch
        if batch is not None and not batch.is_empty() and not prefill_enqueued:
            with lanes.on(prefill_stream, True):
                prefill_result = launch_prefill(s, batch, gate, prefill_stream, prefill_queued)
                if batch.split_prefill_finished:  # its result to the host on this lane, behind its forward
                    prefill_result.copy_done = lanes.event()
                    prefill_result.copy_to_cpu(return_logprob=batch.return_logprob,
                                               return_hidden_states=batch.return_hidden_states)
                    prefill_enqueued = True

        with lanes.on(decode_stream, False):
            if overlap:
                if pending is not None:
                    s.process_batch_result(*pending)  # step k, while step k+1 runs
                pending = launched
                s.bullet_step_in_flight = pending is not None
            elif decode is not None:
                decode_stream.synchronize()
                s.process_batch_result(decode, decode_result)

        if prefill_enqueued and prefill_result.copy_done.query():
            # processed and merged on the decode lane, behind the prefill's GPU work (its tokens
            # relayed on the GPU): what this makes, and what it frees, stays that lane's
            decode_stream.wait_stream(prefill_stream)
            with lanes.on(decode_stream, True):
                s.process_batch_result(batch, prefill_result)  # its copy has landed: no wait
                batch.split_forward_batch = None  # its forward's activations, kept alive by the batch
                if s.running_batch is not None and not s.running_batch.is_empty():
                    s.running_batch.merge_batch(batch)
                else:
                    s.running_batch = batch
            s.split_prefill_batch, prefill_result, prefill_enqueued = None, None, False
            prefill_queued.clear()
            adjust = True
