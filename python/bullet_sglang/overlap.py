"""pdmux's loop with SGLang's CPU/GPU overlap for decode steps while no prefill is in flight
(``--bullet-overlap on``; off by default until measured on the GPU).

Why: SGLang's PD-multiplexing loop waits for every decode step before it processes the result
and prepares the next, so the scheduler's CPU work per step (about 2 ms at batch 10-20 on the
H200) is added to every token; SGLang's own overlap scheduler hides it (decode steps 6.9 ms with
it, 8.8 ms without, docs/sglang-adapter.md). pdmux cannot use that scheduler: SGLang refuses the
two together, its overlap branch of ``run_batch`` would take split prefills down the wrong path,
and it runs every forward on one plain stream, outside our lanes.

What this loop does instead, in SGLang 0.5.15's terms:
- SGLang's ``enable_overlap`` stays off, so ``run_batch`` keeps its split-prefill and non-overlap
  decode paths, which already pass the sampled tokens to the next step on the GPU (SGLang's
  ``FutureMap``): step k+1 never needs step k's tokens on the CPU.
- The decode lane's stream does the scheduling and the forward, so step k+1's preparation queues
  behind step k on that stream.
- While no prefill is in flight, each decode step's result is copied to pinned host memory on
  SGLang's copy stream with a ``copy_done`` event (what its overlap branch does), and step k is
  processed after step k+1 is launched: the CPU waits only for step k's copy, with k+1 queued.
- Requests that finished (or were retracted) at step k already ran in step k+1; SGLang's result
  processor skips them when its ``enable_overlap`` is set, which the scheduler sets (its
  ``batch_result_processor`` is replaced with that flag on), and the running batch is marked
  ``enable_overlap`` so ``prepare_for_decode`` makes new sequence-length tensors instead of
  changing the ones an unprocessed step's snapshot holds.
- Before anything is issued on the prefill lane while a step is in flight, that lane waits on
  the GPU for the decode lane (``wait_stream``): a prefill admitted then (its KV slots and request
  rows may be ones a finished request's last step still writes) runs its first GPU work after
  that step. Admitting a prefill switches stream groups, and a switch processes the step in flight
  and waits for both lanes, so no unprocessed decode step ever runs beside a prefill's forward.
  (A CPU drain whenever requests wait would also stop the overlap under saturation, when waiting
  requests cannot be admitted, and SGLang moves grammar-ready requests into its queue inside the
  admission itself, after any check here.)
- While a prefill is in flight the turn is pdmux's (each decode step processed at once).
- Not overlapped: grammar batches (their vocabulary mask needs the previous token) and batches
  with penalties (``prepare_for_decode`` counts each request's last processed token into the
  penalizers; at every change between overlapped and processed-at-once steps one token would be
  counted twice and another never, where SGLang's own overlap is consistently one step late).

Tensor parallel size is 1 (the adapter refuses more), so a landed prefill needs no all-reduce of
its event flag as pdmux's loop does.
"""

from __future__ import annotations

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
    """Whether decode steps of ``batch`` may be processed one step late (see the module's notes)."""
    return not batch.has_grammar and not batch.sampling_info.penalizer_orchestrator.is_required


def run(s, lanes: Lanes) -> None:
    """The loop, on scheduler ``s`` (our subclass of SGLang's Scheduler); never returns. Counts the
    decode steps it ran and how many were overlapped in ``s.bullet_decode_steps`` and
    ``s.bullet_overlapped_steps`` (logged at group switches)."""
    s.bullet_decode_steps = s.bullet_overlapped_steps = 0
    pending = None  # (snapshot, result) of the decode step launched last and not yet processed
    prefill_result = prefill_event = None
    prefill_enqueued = False  # all its layers are on the prefill lane; merged once they have run
    adjust = False
    prefill_stream, decode_stream = s.stream_groups[s.bullet_group]

    def drain():
        nonlocal pending
        if pending is not None:
            with lanes.on(decode_stream, False):
                s.process_batch_result(*pending)  # waits for that step's copy only
            pending = None

    while True:
        with lanes.on(decode_stream, False):
            s.process_input_requests(s.request_receiver.recv_requests())

        with lanes.on(prefill_stream, True):
            if not prefill_enqueued:
                if pending is not None:  # whatever the admission issues runs after the step in flight
                    prefill_stream.wait_stream(decode_stream)
                adjust = s.update_split_prefill_batch(s.sm_counts[s.bullet_group][0]) or adjust

        with lanes.on(decode_stream, False):
            if s.running_batch is not None:
                s.running_batch.enable_overlap = True  # new seq-len tensors: snapshots stay as launched
            s.running_batch = s.update_running_batch(s.running_batch)
            adjust = adjust or (s.bullet_group > 0 and s.running_batch.is_empty())
            if s.running_batch.is_empty() and s.split_prefill_batch is None and pending is None:
                s.on_idle()

        if adjust:  # a group switch waits for both lanes, as pdmux's does
            drain()
            prefill_stream.synchronize()
            decode_stream.synchronize()
            _, (prefill_stream, decode_stream) = s.adjust_stream_groups()
            adjust = False

        decode = s.running_batch if s.running_batch is not None and not s.running_batch.is_empty() else None
        overlap = decode is not None and s.split_prefill_batch is None and overlappable(decode)
        if not overlap:
            drain()
        launched = decode_result = None
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

        prefill_ran = False
        with lanes.on(prefill_stream, True):
            batch = s.split_prefill_batch
            if batch is not None and not batch.is_empty() and not prefill_enqueued:
                layers = s.model_config.num_hidden_layers
                per_turn = (max(1, s.pdmux_config.split_forward_token_budget // batch.extend_num_tokens)
                            if batch.extend_num_tokens > 0 else layers)
                upto = min(batch.split_index + per_turn, layers)
                batch.split_forward_count = upto - batch.split_index
                prefill_result = s.run_batch(batch)
                if upto == layers:
                    batch.split_prefill_finished = True
                    prefill_event = prefill_stream.record_event()
                batch.split_index = upto
                prefill_ran = True
            elif prefill_enqueued:
                prefill_ran = True

        with lanes.on(decode_stream, False):
            if overlap:
                if pending is not None:
                    s.process_batch_result(*pending)  # step k, while step k+1 runs
                pending = launched
            elif decode is not None:
                decode_stream.synchronize()
                s.process_batch_result(decode, decode_result)

        with lanes.on(prefill_stream, True):
            batch = s.split_prefill_batch
            if prefill_ran and batch.split_prefill_finished:
                prefill_enqueued = True
                if prefill_event.query():
                    s.process_batch_result(batch, prefill_result)
                    if s.running_batch is not None and not s.running_batch.is_empty():
                        s.running_batch.merge_batch(batch)
                    else:
                        s.running_batch = batch
                    s.split_prefill_batch = None
                    prefill_enqueued = False
                    adjust = True
