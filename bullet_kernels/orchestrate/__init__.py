"""Temporal orchestration: profiles, latency estimator, split policy, planner and orchestrator.

    profile = Profile.load(find_profile("h200", "llama-3.1-8b"))
    est = Estimator(profile)
    policy = SLOPolicy(est, ["prefill=84,decode=48", "prefill=100,decode=32"], tpot_ms=20)
    launches = plan_mix(MixWork(4096, 128, 2048, 6), est, policy)
    run = Orchestrator().issue(launches, {"prefill": prefill_fn, "decode": decode_fn}).synchronize()

Importing this package needs no GPU; only :mod:`.orchestrator`, :mod:`.rig` and
:mod:`.profiler` touch one.
"""

from .estimator import Estimate, EstimateError, Estimator, held_out_errors
from .feedback import FeedbackEstimator, StepClock, StepFeedback
from .planner import Launch, MixWork, makespan, plan_mix, sequential_ms, sm_time_bound
from .policy import Decision, SLOPolicy, StaticPolicy, Work
from .profile import MissingProfile, Profile, ProfileError, ProfileMismatch, find_profile, profile_path
from .tpot_budget import TPOT_MODES, CorunShare, corun_step_bound_ms

__all__ = [
    "CorunShare", "corun_step_bound_ms", "Decision", "Estimate", "EstimateError", "Estimator", "FeedbackEstimator", "find_profile",
    "held_out_errors", "Launch", "makespan", "MissingProfile", "MixWork", "plan_mix", "Profile", "profile_path",
    "ProfileError", "ProfileMismatch", "sequential_ms", "SLOPolicy", "sm_time_bound", "StaticPolicy",
    "StepClock", "StepFeedback", "TPOT_MODES", "Work",
]
