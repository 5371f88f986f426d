"""bullet_sglang: Bullet co-location inside SGLang's own runner, without a fork.

``python -m bullet_sglang.launch_server <SGLang server args> --enable-bullet [--bullet-ttft-slo-ms
N --bullet-tpot-slo-ms N --bullet-partition green|tpc]`` checks the setup (``options``, ``version``,
``hooks``: SGLang's extension points, read from its source without importing it; ``setup``: the
latency profile of this GPU and model), then starts SGLang's normal server whose scheduler
process (``child``) runs SGLang's split-prefill loop on bullet_kernels' verified lanes, the split
chosen per prefill by our SLO policy (``scheduler``, ``stream_groups``). Built against SGLang
0.5.15; run on the H200, where its greedy outputs equal unmodified SGLang's and its goodput is
measured against SGLang's (docs/sglang-adapter.md). Importing this package never imports SGLang.
"""

__version__ = "0.1.0"
