"""A synthetic latency profile with a known closed form, for the orchestrator's CPU tests.

Decode steps and prefill groups follow ``a + b / sms`` (the estimator's model between SM
counts), linear in batch x context and in tokens, so interpolation between grid points is exact
and any error a test sees is the estimator's, not the data's.
"""

from bullet_kernels.models.presets import preset_config
from bullet_kernels.orchestrate.profile import Profile
from bullet_kernels.partition import SMSplit

SPLITS = [SMSplit.parse(s) for s in ("prefill=100,decode=32", "prefill=84,decode=48",
                                     "prefill=68,decode=64", "prefill=52,decode=80")]
BATCHES, CONTEXTS, TOKENS, GROUPS = (8, 32, 64, 128), (512, 1024, 2048, 4096), (512, 1024, 2048, 4096), 4
SLOWDOWN = {"prefill": 1.2, "decode": 1.15}


def decode_ms(batch, context, sms):
    return 4.0 + (1.0 + batch * context / 65536) * 132 / sms


def prefill_group_ms(tokens, group, sms):
    return 0.2 + (tokens / 4096) * 25 * 132 / sms * (1.1 if group == GROUPS - 1 else 1.0)


def synthetic_profile(sm_count=132, with_corun=True) -> Profile:
    p = Profile.new(
        gpu="h200", model="llama-3.1-8b", model_config=preset_config("llama-3.1-8b"),
        device={"name": "NVIDIA H200", "sm_count": sm_count}, driver={}, software={}, commit="test",
        command="synthetic", engine={"layer_groups": GROUPS}, timing={}, power={}, grid={},
    )
    p.add_sm_config("whole-gpu", "main", sm_count, sm_count)
    for s in SPLITS:
        for lane in s.names:
            p.add_sm_config(s.key, lane, s[lane], s[lane])
    for key, lane, n in [("whole-gpu", "main", sm_count)] + [(s.key, "decode", s["decode"]) for s in SPLITS]:
        for b in BATCHES:
            for c in CONTEXTS:
                p.add_point("decode", dict(batch=b, context=c, split=key, lane=lane, sms=n, ms=decode_ms(b, c, n)))
    for key, lane, n in [("whole-gpu", "main", sm_count)] + [(s.key, "prefill", s["prefill"]) for s in SPLITS]:
        for t in TOKENS:
            for g in range(GROUPS):
                p.add_point("prefill", dict(tokens=t, group=g, split=key, lane=lane, sms=n, ms=prefill_group_ms(t, g, n)))
    if with_corun:
        for s in SPLITS:
            for t in (2048, 4096):
                for b, c in ((32, 1024), (128, 2048)):
                    ap, ad = prefill_group_ms(t, 1, s["prefill"]), decode_ms(b, c, s["decode"])
                    p.add_point("corun", {
                        "split": s.key,
                        "prefill": {"tokens": t, "group": 1, "alone_ms": ap, "corun_ms": ap * SLOWDOWN["prefill"],
                                    "slowdown": SLOWDOWN["prefill"]},
                        "decode": {"batch": b, "context": c, "alone_ms": ad, "corun_ms": ad * SLOWDOWN["decode"],
                                   "slowdown": SLOWDOWN["decode"]}})
    p.complete = True
    return p
