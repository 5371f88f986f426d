"""bullet_sglang: Bullet co-location inside SGLang's own runner, without a fork (in progress).

Status: the launcher and its checks exist (``options``: our flags and the SGLang options they
refuse; ``version``: the supported SGLang; ``hooks``: SGLang's extension points, checked against
its source without importing it). The co-location itself is not built yet. Importing this package
never imports SGLang.

What the adapter will do (the SGLang adapter issue): ``python -m bullet_sglang.launch_server
<SGLang server args> --enable-bullet [--bullet-ttft-slo-ms N --bullet-tpot-slo-ms N
--bullet-partition green|tpc]`` installs the integration, then starts SGLang's normal server.
Inside SGLang it captures decode CUDA graphs once per (batch bucket, SM configuration) on
bullet_kernels partition streams, runs prefill as layer groups on the prefill lane, and runs
both lanes at the same time under bullet_kernels' orchestrator and SLO policy, with the KV cache
shared in one process (no copies). It hooks SGLang's extension points (model runner, CUDA graph
runners, scheduler loop) by subclassing, never by copying SGLang source, targets SGLang 0.5.15,
and refuses other versions and incompatible options with a clear error before taking GPU memory.
"""

__version__ = "0.1.0"
