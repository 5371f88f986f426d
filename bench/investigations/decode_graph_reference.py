"""Graph decode vs eager decode vs an eager prefill of the same whole sequences (the reference), whole GPU.

Why the model-graph GPU test allows decode logits 2% from eager: the three are about equally
far apart (bf16 noise of a random 30-layer model), so the graph is no worse than eager. Run:
`python3 bench/investigations/decode_graph_reference.py` on a GPU.
"""
import torch
from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import WHOLE_GPU, ModelRunner
from bullet_kernels.models.presets import random_model
from bullet_kernels.partition import Partitioner

CFG = EngineConfig(page_size=16, decode_buckets=(8,), prefill_buckets=(512,), prefill_max_seqs=4,
                   layer_groups=3, kv_num_pages=512, max_context=1024)
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
torch.manual_seed(0)
model = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, max_context=1024)
V = model.config.vocab_size
prompts = {r: torch.randint(0, V, (n,)).tolist() for r, n in (("a", 300), ("b", 77))}
dt = torch.randint(0, V, (2,)).tolist()
def eager(runner, step):
    ids, batch = step
    with torch.no_grad():
        return runner.run(ids.cuda(), batch.to("cuda"))
with Partitioner("green") as parts:
    r = ModelRunner(model, CFG, parts)
    r.reserve(list(prompts.items())); pre = r.plan_prefill(list(prompts.items()))
    r.reserve([(k, [t]) for k, t in zip(prompts, dt)]); dec = r.plan_decode(list(prompts), dt)
    eager(r, pre); e_dec = eager(r, dec)
    r.capture(WHOLE_GPU); s = torch.cuda.Stream()
    r.forward(*pre, WHOLE_GPU, stream=s); s.synchronize()
    g_dec = r.forward(*dec, WHOLE_GPU, stream=s); s.synchronize()
    r2 = ModelRunner(model, CFG, parts)
    full = {k: v + [t] for (k, v), t in zip(prompts.items(), dt)}
    r2.reserve(list(full.items())); ref = eager(r2, r2.plan_prefill(list(full.items())))
    print("shapes", e_dec.shape, g_dec.shape, ref.shape)
    print(f"eager decode vs ref {rel(e_dec, ref):.5f}; graph decode vs ref {rel(g_dec[:2], ref):.5f}; graph vs eager {rel(g_dec[:2], e_dec):.5f}")
    print("argmax eq eager/ref", (e_dec.argmax(-1) == ref.argmax(-1)).tolist(), "graph/ref", (g_dec[:2].argmax(-1) == ref.argmax(-1)).tolist())
