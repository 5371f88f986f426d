"""Paged KV cache: page accounting, atomic failure, sizing."""

from __future__ import annotations

import pytest
import torch

from bullet_kernels.errors import BulletError
from bullet_kernels.engine.kv_cache import KVCacheExhausted, PagedKVCache, kv_bytes_per_page, pages_for_budget
from bullet_kernels.models import preset_config


def make_cache(num_pages: int = 4, page_size: int = 4) -> PagedKVCache:
    return PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=num_pages, page_size=page_size,
                        dtype=torch.float32)


def snapshot(cache: PagedKVCache, request_ids) -> tuple:
    return cache.num_free_pages, {r: (cache.pages(r), cache.num_tokens(r), r in cache) for r in request_ids}


def test_layout_is_per_layer_views_of_one_allocation():
    cache = make_cache()
    assert len(cache.k_caches) == len(cache.v_caches) == 2
    assert cache.k_caches[1].shape == (4, 4, 2, 8)  # [num_pages, page_size, kv_heads, head_dim]
    cache.v_caches[1][3, 2] = 7.0
    assert cache._storage[1, 1, 3, 2].eq(7.0).all()


def test_pages_are_taken_only_when_a_page_fills():
    cache = make_cache()
    cache.allocate("a", 3)
    assert cache.pages("a") == (0,) and cache.num_tokens("a") == 3
    cache.allocate("a", 1)
    assert cache.pages("a") == (0,)
    cache.allocate("b", 1)
    cache.allocate("a", 1)
    assert cache.pages("a") == (0, 2) and cache.pages("b") == (1,)
    assert cache.num_free_pages == 1
    assert cache.pages_needed("a", 3) == 0 and cache.pages_needed("a", 4) == 1


def test_free_returns_pages_for_reuse():
    cache = make_cache()
    cache.allocate("a", 9)
    cache.free("a")
    assert "a" not in cache and cache.num_free_pages == 4 and cache.num_tokens("a") == 0
    cache.allocate("b", 16)
    assert sorted(cache.pages("b")) == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="'a' holds no KV pages"):
        cache.free("a")


def test_exhausted_says_requested_and_free_and_changes_nothing():
    cache = make_cache()
    cache.allocate("a", 10)  # 3 of 4 pages
    before = snapshot(cache, ["a", "b", "c"])
    with pytest.raises(KVCacheExhausted) as e:
        cache.allocate_many([("b", 2), ("a", 2), ("c", 4)])  # b fits alone; together they need 2
    assert isinstance(e.value, BulletError)
    assert "2 pages requested" in str(e.value) and "only 1 of 4 pages are free" in str(e.value)
    assert snapshot(cache, ["a", "b", "c"]) == before
    with pytest.raises(KVCacheExhausted, match="3 pages requested"):
        cache.allocate("a", 12)
    assert snapshot(cache, ["a", "b", "c"]) == before


def test_negative_allocation_is_refused():
    with pytest.raises(ValueError, match="cannot allocate -1 tokens"):
        make_cache().allocate("a", -1)


def test_sizing_from_a_memory_budget():
    config = preset_config("llama-3.1-8b")
    per_page = kv_bytes_per_page(32, 8, 128, 16, torch.bfloat16)
    assert per_page == 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB: 128 KiB per token
    assert pages_for_budget(10 * per_page + 1, num_layers=32, num_kv_heads=8, head_dim=128) == 10
    with pytest.raises(ValueError, match="holds no page"):
        pages_for_budget(per_page - 1, num_layers=32, num_kv_heads=8, head_dim=128)
    tiny = preset_config("tiny-qwen3")
    cache = PagedKVCache.for_model(tiny, budget_bytes=5 * kv_bytes_per_page(2, 2, 32, 16, torch.float32),
                                   dtype=torch.float32)
    assert cache.num_pages == 5 and cache.k_caches[0].shape == (5, 16, 2, 32)
    with pytest.raises(ValueError, match="exactly one of"):
        PagedKVCache.for_model(config, num_pages=4, budget_bytes=1 << 30)
