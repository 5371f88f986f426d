"""How many KV pages a runner gets: the sizing rule, in one place.

First rule that applies:

1. ``cfg.kv_num_pages``: exactly that many pages.
2. ``cfg.kv_budget_bytes``: as many pages as fit in that many bytes.
3. On a GPU, the memory left after the weights (the model is loaded before the runner is made)
   and a reserve for graph capture, as serving engines size their KV pools::

       budget = usable * gpu_memory_fraction - capture_reserve
       usable = free device memory + memory torch's allocator caches but does not use

   ``capture_reserve`` (:func:`capture_reserve_bytes`) estimates what capturing every configured
   bucket takes: the static buffers of every bucket, one private pool per phase holding the
   intermediates of its largest bucket (doubled for allocator rounding and per-split copies of
   workspaces), plus :data:`WORKSPACE_MARGIN_BYTES`. Capture reports what it really took
   (``ModelRunner.capture(...)["memory_bytes"]``); give ``kv_budget_bytes`` to size exactly.
4. On the CPU (nothing to measure): enough pages for ``prefill_max_seqs`` sequences of full
   context, at most :data:`CPU_DEFAULT_KV_BYTES`; give ``kv_num_pages`` or ``kv_budget_bytes``
   for more.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import EngineConfig
from .kv_cache import kv_bytes_per_page

CPU_DEFAULT_KV_BYTES = 256 << 20
# cuBLAS workspaces (one per stream a lane captures on), kernel images loaded at first launch
# and allocator rounding: a margin, not a measurement.
WORKSPACE_MARGIN_BYTES = 512 << 20


@dataclasses.dataclass(frozen=True)
class KVSizing:
    num_pages: int
    bytes_per_page: int
    rule: str  # how the size was chosen, for logs and stats


def capture_reserve_bytes(config, cfg: EngineConfig, dtype: torch.dtype, max_pages: int) -> int:
    """Bytes to keep free for capturing every bucket of ``cfg`` (an estimate; see the module)."""
    item = torch.empty((), dtype=dtype).element_size()
    h, vocab, seqs = config.hidden_size, config.vocab_size, cfg.prefill_max_seqs
    # one layer's live activations per token: q, k, v, attention out, gate+up, activation, norms
    per_token = (2 * config.q_size + 2 * config.kv_size + 3 * config.intermediate_size + 4 * h) * item
    metadata_per_token, metadata_per_seq = 3 * 8, 3 * 8 + 4 + 4 * max_pages
    static = sum(b * (metadata_per_token + metadata_per_seq + 4 * vocab) for b in cfg.decode_buckets)
    static += sum(t * (metadata_per_token + 2 * h * item) + seqs * (metadata_per_seq + 4 * vocab)
                  for t in cfg.prefill_buckets)
    largest_decode, largest_prefill = max(cfg.decode_buckets), max(cfg.prefill_buckets)
    pools = largest_decode * (per_token + vocab * (item + 4)) + largest_prefill * per_token + seqs * vocab * (item + 4)
    return 2 * (static + pools) + WORKSPACE_MARGIN_BYTES


def size_kv_cache(config, cfg: EngineConfig, dtype: torch.dtype, device: torch.device, max_pages: int) -> KVSizing:
    """Pages for a model of ``config`` on ``device`` by the rules above."""
    per_page = kv_bytes_per_page(config.num_layers, config.num_kv_heads, config.head_dim, cfg.page_size, dtype)
    if cfg.kv_num_pages is not None:
        return KVSizing(cfg.kv_num_pages, per_page, f"kv_num_pages={cfg.kv_num_pages}")
    if cfg.kv_budget_bytes is not None:
        return KVSizing(_pages(cfg.kv_budget_bytes, per_page, "kv_budget_bytes"), per_page,
                        f"kv_budget_bytes={cfg.kv_budget_bytes}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        reserve = capture_reserve_bytes(config, cfg, dtype, max_pages)
        budget = int(usable * cfg.gpu_memory_fraction) - reserve
        rule = (f"{cfg.gpu_memory_fraction} of {usable >> 20} MiB usable minus a {reserve >> 20} MiB capture reserve")
        return KVSizing(_pages(budget, per_page, rule), per_page, rule)
    pages = min(cfg.prefill_max_seqs * max_pages, max(1, CPU_DEFAULT_KV_BYTES // per_page))
    return KVSizing(pages, per_page, f"CPU default: {pages} pages (at most {CPU_DEFAULT_KV_BYTES >> 20} MiB)")


def _pages(budget: int, per_page: int, rule: str) -> int:
    if budget < per_page:
        raise ValueError(
            f"the KV budget ({rule}: {max(budget, 0)} bytes) holds no page of {per_page} bytes; "
            "free memory, lower the buckets, or set kv_num_pages / kv_budget_bytes explicitly"
        )
    return budget // per_page
