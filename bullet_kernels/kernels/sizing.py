"""How many SMs the code being launched may use, and the launch sizes that follow from it.

Kernels size their grids for the SMs they will really run on. A decode lane on a 32-SM
partition that launches a grid sized for 132 SMs runs 4 waves where it planned 1 and leaves
the tail idle (FlashInfer drew 0.74 TB/s that way, docs/design.md). So the graph bank wraps each
capture in ``sm_budget(lane.granted)``, and every kernel asks :func:`current_sm_budget`.

Grids are fixed at capture time: a CUDA graph replays the launch sizes chosen while it was
captured. A graph captured under ``sm_budget(32)`` keeps its 32-SM grid when replayed on
any other partition, which is why graphs are keyed by SM split.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator

DEFAULT_SMS = 132  # H100 SXM, the answer when there is no GPU to ask

_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("sm_budget", default=None)


@functools.lru_cache(maxsize=None)
def device_sm_count() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    except Exception:  # a broken CUDA install must not stop CPU users
        pass
    return DEFAULT_SMS


def current_sm_budget() -> int:
    """SMs available to kernels launched now: the innermost ``sm_budget``, else the whole GPU."""
    n = _budget.get()
    return device_sm_count() if n is None else n


@contextlib.contextmanager
def sm_budget(n: int) -> Iterator[int]:
    """Size launches inside this block for ``n`` SMs (a context variable: per thread and task)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sm_budget needs a positive int SM count, got {n!r}")
    token = _budget.set(n)
    try:
        yield n
    finally:
        _budget.reset(token)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Decode attention: how many KV splits per sequence (flash-decoding). A program (one KV-head
# group, one warp, 32-token tiles, 3 stages: 37 KB of shared memory, 252 registers a thread
# on the H100 with Triton 3.6) fits CTAS_PER_SM times on an SM. Programs of one launch take
# equal time (each split gets an equal share of its sequence), so the grid runs in waves:
#     time(splits) ~ ceil(programs / slots) * (tokens per split + PROGRAM_OVERHEAD) + merge
# where the overhead (start-up, pipeline fill, partial-output write) and the merge pass are
# in token-equivalents. Fitted to 31 measured shapes x SM counts on the H100 (batch 16-128,
# context 1k-32k, 16-132 SMs; tune-decode-attention-*-20261126.json): the pick is within 1%
# of the best split count on average and within 5% in the worst case (the wave-fill
# heuristic it replaces: 3% and 16%).
CTAS_PER_SM = 6
PROGRAM_OVERHEAD_TOKENS = 512
MERGE_TOKENS = 256
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


def _split_time(base: int, splits: int, slots: int, max_context: int) -> float:
    waves = math.ceil(base * splits / slots)
    return waves * (max_context / splits + PROGRAM_OVERHEAD_TOKENS) + (MERGE_TOKENS if splits > 1 else 0)


def decode_kv_splits(batch: int, kv_heads: int, group: int, max_context: int, sms: int | None = None) -> int:
    """KV splits per sequence for flash-decoding, from shapes and the SM budget only.

    ``max_context`` is a static bound (page_table width x page size), never the live seq_lens,
    so the grid is the same on every replay of a captured graph. ``group`` (query heads per
    KV head) rides in the rows of one program and does not change the grid.
    """
    sms = current_sm_budget() if sms is None else sms
    base = max(1, batch * kv_heads)
    slots = CTAS_PER_SM * sms
    context = max(1, max_context)
    cap = max(1, min(MAX_SPLITS, context // MIN_TOKENS_PER_SPLIT))
    best, best_time = 1, _split_time(base, 1, slots, context)
    for splits in range(2, cap + 1):
        t = _split_time(base, splits, slots, context)
        if t * 1.02 < best_time:  # a split must win by 2%: each costs a launch and partials
            best, best_time = splits, t
    return best


def gemm_split_k(m_tiles: int, n_tiles: int, k: int, block_k: int, sms: int | None = None) -> int:
    """Split-K factor so a skinny GEMM fills the budget ~1-2 waves with >= 4 K steps a split."""
    sms = current_sm_budget() if sms is None else sms
    tiles = m_tiles * n_tiles
    if tiles >= sms:
        return 1
    cap = max(1, k // (4 * block_k))
    return max(1, min(cap, cdiv(2 * sms, tiles), 16))
