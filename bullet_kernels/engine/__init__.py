"""The request path: batches, the paged KV cache, captured graphs and the runner that ties them.

    from bullet_kernels.config import EngineConfig
    from bullet_kernels.engine import ModelRunner, Placement

    runner = ModelRunner(model, EngineConfig(decode_buckets=(1, 8, 32)))
    runner.capture(Placement(split, "decode"), phases=("decode",))
    runner.reserve([("a", [5])])
    ids, batch = runner.plan_decode(["a"], [5])
    logits = runner.forward(ids, batch, Placement(split, "decode"))
"""

from __future__ import annotations

from .batch import Bucket, ForwardBatch, SeqChunk, pack_input_ids, pad_input_ids, plan_decode, plan_prefill
from .graph_bank import CapturedGraph, GraphBank, GraphKey, default_buckets, pick_bucket
from .kv_cache import KVCacheExhausted, PagedKVCache, kv_bytes_per_page, pages_for_budget
from .memory import KVSizing, capture_reserve_bytes, size_kv_cache
from .model_graphs import ModelGraphs, layer_groups
from .placement import WHOLE_GPU, Placement
from .runner import ContextTooLong, ModelRunner, Request
from .step import EagerStep, GraphStep, Step
from .warn import forget_warnings, warn_once

__all__ = [
    "Bucket", "CapturedGraph", "ContextTooLong", "EagerStep", "ForwardBatch", "GraphBank", "GraphKey",
    "GraphStep", "KVCacheExhausted", "KVSizing", "ModelGraphs", "ModelRunner", "PagedKVCache", "Placement",
    "Request", "SeqChunk", "Step", "WHOLE_GPU", "capture_reserve_bytes", "default_buckets", "forget_warnings",
    "kv_bytes_per_page", "layer_groups", "pack_input_ids", "pad_input_ids", "pages_for_budget", "pick_bucket",
    "plan_decode", "plan_prefill", "size_kv_cache", "warn_once",
]
