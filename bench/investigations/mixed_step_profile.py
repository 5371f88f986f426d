"""Why is a chunked-prefill step so much slower than its parts? A diagnostic for the serving issue.

Measured in the serving loop on the H200 (docs/serving.md): a fused step of a ~512-token prompt
chunk and 16-31 decode rows took 19 ms, against 11.4 ms for a 512-token prefill alone and
5.2-6 ms for the decode batch alone, although the fused step reads the weights once. This
times, on the whole GPU with the llama-3.1-8b preset (random weights), with CUDA graphs as the
server runs them:

- ``prefill``: one 512-token prompt, nothing cached;
- ``chunk``: a 512-token chunk continuing a prompt with 1,024 tokens cached;
- ``decode``: DECODE rows at 1,200 tokens of context, as a decode step;
- ``mixed``: the chunk and the decode rows fused in one prefill-path step (what chunked mode runs);

then profiles the eager ``decode`` and ``mixed`` steps with torch.profiler and prints the CUDA kernels that
take the time, so the next change is made where the time is.

    python3 bench/investigations/mixed_step_profile.py [DECODE]
"""

from __future__ import annotations

import sys

import torch

from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import ModelRunner
from bullet_kernels.measure import EventTimer
from bullet_kernels.models.presets import random_model


def main() -> None:
    decode_rows = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    model = random_model("llama-3.1-8b", seed=0, dtype=torch.bfloat16, device=torch.device("cuda"), max_context=4096)
    cfg = EngineConfig(kv_num_pages=4096, max_context=4096, lazy_capture=True, prefill_max_seqs=129,
                       decode_buckets=(8, 16, 32, 64), prefill_buckets=(512, 1024))
    runner = ModelRunner(model, cfg)
    prompt = [3 + i % 30000 for i in range(1536)]
    runner.reserve([("p", prompt[:1024])])
    decoders = [f"d{i}" for i in range(decode_rows)]
    runner.reserve([(d, prompt[:1199]) for d in decoders])
    runner.reserve([(d, [7]) for d in decoders])
    runner.reserve([("fresh", prompt[:512])])
    chunk = prompt[1024:1024 + 512 - decode_rows]
    runner.reserve([("p", chunk)])

    plans = {
        "prefill": runner.plan_prefill([("fresh", prompt[:512])]),
        "chunk": runner.plan_prefill([("p", chunk)]),
        "decode": runner.plan_decode(decoders, [7] * decode_rows),
        "mixed": runner.plan_mixed([("p", chunk)], decoders, [7] * decode_rows),
    }
    print(f"H200 check: {torch.cuda.get_device_name(0)}; decode rows {decode_rows}, chunk {len(chunk)} tokens")
    for name, (ids, batch) in plans.items():
        step = runner.prepare(ids, batch)
        timer = EventTimer(lambda step=step: step.launch(), calls_per_round=5)
        timer.warmup()
        stats = timer.run(5)
        print(f"{name:>8}: graph {stats['median_ms']:.2f} ms (p10 {stats['p10_ms']:.2f}, p90 {stats['p90_ms']:.2f}); "
              f"eager steps so far {runner.stats['eager_steps']}")

    for name in ("decode", "mixed"):  # decode too: which of its kernels sit below their roofline
        ids, batch = plans[name]
        ids, batch = ids.cuda(), batch.to("cuda")
        with torch.no_grad():
            runner.run(ids, batch)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                runner.run(ids, batch)
                torch.cuda.synchronize()
        print(f"--- eager {name} step, CUDA kernels")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))

if __name__ == "__main__":
    main()
