"""SGLang's scheduler with our lanes and policy: a subclass made in SGLang's scheduler process.

SGLang 0.5.15's PD-multiplexing already runs the loop Bullet needs (``event_loop_pdmux``: the
decode step on the decode stream, the next layers of a split prefill on the prefill stream, the
CPU waiting on the decode stream only, the prefill merged into the running batch once an event
after its last layers has landed). What it lacks, we override:

- ``init_pdmux``: the stream groups are our verified lanes (``open_groups``), not sgl-kernel's
  green contexts, and pdmux's config carries their count;
- ``adjust_stream_groups``: the group comes from our SLO policy (:func:`.stream_groups.choose_group`).
  The loop asks only with both streams idle: when a prefill is admitted or merged, or decode ran
  dry, so a split holds for a whole prefill. It also sizes pdmux's per-turn token budget so that
  the turn that admits a prefill enqueues all its layers (:data:`PREFILL_LAYERS_PER_TURN`).
- ``run_batch``: with step feedback on, times each decode step, launch to the next launch on the
  same group, against the profile's estimate for it, so the policy plans with SGLang's real step
  times (:mod:`bullet_kernels.orchestrate.feedback`);
- ``event_loop_pdmux``: unless ``--bullet-overlap off``, our version of pdmux's loop that overlaps
  the CPU's work with decode steps, beside prefills too, and switches groups with GPU waits
  (:mod:`.overlap`);
- ``gpu_id`` and ``tp_size``: 0.5.15's pdmux reads them from the scheduler, which keeps them only
  in ``self.ps``; without them pdmux cannot start (its own launch fails that way).

``pdmux`` is SGLang's ``sglang.srt.multiplex.pdmux_context`` module (its stream groups are module
state its graph runner and scheduler read); tests pass a stand-in with the same names.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any, Callable

from bullet_kernels.orchestrate import StepClock
from bullet_kernels.orchestrate.policy import round_up_work

from .overlap import Lanes
from .overlap import run as overlapped_loop
from .stream_groups import PREFILL_ALONE, GroupPlan, choose_group, groups_left

logger = logging.getLogger("bullet_sglang")

# Layers of a split prefill enqueued per turn of pdmux's loop; None: all of them at once.
# Decision (measured on the H200 at e48b00f, docs/sglang-adapter.md): the loop re-decides the split
# only when a prefill is admitted or merged, never between its layers, so enqueueing the layers a
# few at a time buys no decision; it only leaves the prefill lane idle while each turn waits for
# the decode step. With one policy layer group (4 of 32 layers) a turn, a 1k-token prefill took 8
# decode steps and P50 TTFT was 177-246 ms against unmodified SGLang's 51-70 ms; the decode lane
# ran those 8 steps on 32 SMs.
PREFILL_LAYERS_PER_TURN: int | None = None

# With step feedback, the measured-minus-profiled step times per decode lane are logged this often
# (decode steps), so a run's log shows what the policy planned with.
FEEDBACK_LOG_EVERY = 2000


def decode_shape(running) -> tuple[int, int] | None:
    """(batch, longest context) of the running decode batch, or None when there is none."""
    if running is None or running.is_empty():
        return None
    return running.batch_size(), max(len(r.origin_input_ids) + len(r.output_ids) for r in running.reqs)


def profiled_step(policy) -> Callable[[int, int, int, bool], float]:
    """``step_ms(batch, context, decode SMs, co-running)``: the profile's decode step, uncorrected
    (what measured steps are compared with), cached on work rounded like the policy's."""
    est = policy.estimator

    @functools.lru_cache(maxsize=8192)
    def cached(batch: int, context: int, sms: int, corun: bool) -> float:
        alone = est.profiled_decode_ms(batch, context, sms)
        return (est.corun(alone, "decode", sms) if corun else alone).ms

    return lambda batch, context, sms, corun: cached(batch, round_up_work(context), sms, corun)


def _from_parallel_state(name: str) -> property:
    """A scheduler attribute read from ``self.ps`` (where 0.5.15 keeps it), unless one was set."""
    key = f"_bullet_{name}"
    return property(lambda self: self.__dict__.get(key, getattr(self.ps, name)),
                    lambda self, value: self.__dict__.__setitem__(key, value))


# The policy's targets SGLang's /set_internal_state may change at serving time (a benchmark runs
# every target on one server: each start captures every stream group's decode graphs, minutes).
# TPOT only: the SLO policy picks splits by TPOT; its TTFT target only marks a decision at risk,
# which SGLang's loop has no use for (it cannot hold a prefill back), so it is not offered here.
POLICY_TARGETS = {"bullet_tpot_slo_ms": "tpot_ms", "bullet_tpot_mode": "tpot_mode"}


def update_policy_targets(policy, changes: dict) -> str:
    """Set ``policy``'s targets from ``{"bullet_tpot_slo_ms": ms, "bullet_tpot_mode": "step" or
    "average"}``; "" when done, else why nothing was changed (an unknown key, a value that is not
    a positive number of milliseconds, an unknown mode)."""
    from bullet_kernels.orchestrate import TPOT_MODES

    for key, value in changes.items():
        if key not in POLICY_TARGETS:
            return f"{key} is not one of {', '.join(POLICY_TARGETS)} (bullet's targets are set apart from SGLang's own state)"
        if key == "bullet_tpot_mode":
            if value not in TPOT_MODES:
                return f"{key} must be one of {', '.join(TPOT_MODES)}, got {value!r}"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            return f"{key} must be a positive number of milliseconds, got {value!r}"
    for key, value in changes.items():
        if key == "bullet_tpot_mode":
            policy.set_tpot_mode(value)
        else:
            setattr(policy, POLICY_TARGETS[key], float(value))
    return ""


def policy_targets(policy) -> dict:
    return {key: getattr(policy, attr) for key, attr in POLICY_TARGETS.items()}


def bullet_scheduler_class(base: type, plan: GroupPlan, policy, open_groups: Callable[[GroupPlan, int], list],
                           pdmux: Any, policy_groups: int, state_output: Callable[..., Any] | None = None,
                           feedback=None, clock: Callable[[], float] = time.perf_counter,
                           overlap: bool = False) -> type:
    """A subclass of SGLang's ``Scheduler`` (``base``) running pdmux's loop on ``plan``'s groups.

    ``open_groups(plan, gpu_id)`` returns one (prefill stream, decode stream) per group. The TTFT
    target is the policy's (``policy.ttft_ms``). ``state_output`` builds SGLang's
    ``SetInternalStateReqOutput`` (imported from SGLang when None; tests pass a stand-in).
    ``feedback``: the ``StepFeedback`` of the policy's ``FeedbackEstimator``, fed from measured
    decode steps (``clock`` reads seconds), or None to plan with the profile alone. ``overlap``:
    run :mod:`.overlap`'s loop instead of pdmux's."""
    steps = StepClock(feedback) if feedback is not None else None
    step_ms = profiled_step(policy) if feedback is not None else None
    share = getattr(policy, "corun_share", None)  # what the policy's average TPOT mode plans from

    class BulletScheduler(base):
        gpu_id = _from_parallel_state("gpu_id")
        tp_size = _from_parallel_state("tp_size")

        def init_pdmux(self) -> None:
            self.split_prefill_batch = None
            self.pdmux_config = pdmux.PDMuxConfig(sm_group_num=plan.size)
            groups = list(open_groups(plan, self.gpu_id))
            if len(groups) != plan.size:
                raise RuntimeError(f"{len(groups)} stream groups opened for a plan of {plan.size}")
            pdmux.STREAM_GROUPS = groups
            pdmux.SM_COUNTS = plan.sm_counts()
            pdmux.set_current_stream_idx(0)
            self.stream_groups, self.sm_counts, self.real_sm_group_num = groups, pdmux.SM_COUNTS, plan.size
            self.bullet_group = 0
            logger.info("bullet_sglang: %d stream groups, (prefill, decode) SMs %s; splits from the SLO policy%s",
                        plan.size, plan.sm_counts(), "; decode steps overlapped, prefills issued in the CPU's slack" if overlap else "")

        def init_batch_result_processor(self) -> None:
            # SGLang builds its result processor after init_pdmux, so the flag is set here
            super().init_batch_result_processor()
            if overlap:  # skip requests that finished while their next step was in flight (overlap.py)
                self.batch_result_processor = dataclasses.replace(self.batch_result_processor, enable_overlap=True)

        def event_loop_pdmux(self):
            if not overlap:
                return super().event_loop_pdmux()
            import torch
            from sglang.srt.distributed.parallel_state import set_pdmux_status

            with torch.inference_mode():
                overlapped_loop(self, Lanes(set_pdmux_status))

        def is_fully_idle(self, for_health_check=False) -> bool:
            # SGLang's check sees neither a split prefill in flight nor the overlapped loop's
            # unprocessed step (a /flush_cache then would reset the pools under them)
            return (super().is_fully_idle(for_health_check) and self.split_prefill_batch is None
                    and not getattr(self, "bullet_step_in_flight", False))

        def adjust_stream_groups(self):
            if steps is not None:
                steps.interrupt()  # the step in progress spans the switch: it is no lane's
            decode = decode_shape(self.running_batch)
            prefill, left = None, 0
            if self.split_prefill_batch is not None and not self.split_prefill_batch.is_empty():
                prefill = self.split_prefill_batch.extend_num_tokens
                layers = self.model_config.num_hidden_layers
                left = groups_left(self.split_prefill_batch.split_index, layers, policy_groups)
                # pdmux runs budget // tokens layers a turn
                self.pdmux_config.split_forward_token_budget = max(1, prefill) * (PREFILL_LAYERS_PER_TURN or layers)
            idx = choose_group(plan, policy, decode, prefill, left, policy.ttft_ms)
            pdmux.set_current_stream_idx(idx)
            self.tp_worker.model_runner.update_decode_attn_backend(idx)
            if idx != self.bullet_group:
                overlapped = (f"; decode steps overlapped {self.bullet_overlapped_steps} of {self.bullet_decode_steps}"
                              if hasattr(self, "bullet_decode_steps") else "")
                logger.info("bullet_sglang: stream group %d, (prefill, decode) SMs %s; decode %s, prefill %s tokens, "
                            "%d layer groups left%s", idx, plan.sm_counts()[idx], decode, prefill, left, overlapped)
                self.bullet_group = idx
            return idx, self.stream_groups[idx]

        def run_batch(self, batch, *args, **kwargs):
            if batch is self.running_batch:  # both loops: the decode step
                corun = self.bullet_group not in (PREFILL_ALONE, plan.decode_alone)
                if share is not None:
                    share.observe(corun)
                if steps is not None:
                    self._bullet_time_decode_step(corun)
            return super().run_batch(batch, *args, **kwargs)

        def _bullet_time_decode_step(self, corun: bool) -> None:
            sms = self.sm_counts[self.bullet_group][1]
            shape = decode_shape(self.running_batch)
            if shape is None or sms == 0:
                steps.interrupt()
                return
            steps.launched(clock(), sms, step_ms(shape[0], shape[1], sms, corun))
            if feedback.observed - self.__dict__.get("_bullet_logged_at", 0) >= FEEDBACK_LOG_EVERY:
                self._bullet_logged_at = feedback.observed
                logger.info("bullet_sglang: decode steps measured minus profiled (ms) by decode SMs: %s", feedback.summary())

        def set_internal_state(self, recv_req):
            """SGLang's /set_internal_state, which also takes our policy's targets
            (:data:`POLICY_TARGETS`); a request naming both ours and SGLang's is refused whole."""
            ours = {k: v for k, v in recv_req.server_args.items() if k.startswith("bullet_")}
            if not ours:
                return super().set_internal_state(recv_req)
            why = ("give bullet's targets apart from SGLang's own state" if len(ours) < len(recv_req.server_args)
                   else update_policy_targets(policy, ours))
            if why:
                logger.warning("bullet_sglang: /set_internal_state refused: %s", why)
            else:
                logger.info("bullet_sglang: policy targets now %s", policy_targets(policy))
            if state_output is None:
                from sglang.srt.managers.io_struct import SetInternalStateReqOutput as output
            else:
                output = state_output
            return output(updated=not why, server_args=policy_targets(policy))

    BulletScheduler.__qualname__ = BulletScheduler.__name__ = f"Bullet{base.__name__}"
    return BulletScheduler
