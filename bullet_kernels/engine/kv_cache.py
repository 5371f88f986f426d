"""Paged KV cache: fixed-size pages handed out to requests from a free list.

Each layer owns ``k``/``v`` tensors of shape ``[num_pages, page_size, num_kv_heads, head_dim]``
(the layout of :mod:`bullet_kernels.kernels`). A request's tokens live in its pages in order;
token ``i`` sits in slot ``pages[i // page_size] * page_size + i % page_size``. The tensors are
allocated once, so captured CUDA graphs can keep pointing at them.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from ..errors import BulletError

DEFAULT_PAGE_SIZE = 16


class KVCacheExhausted(BulletError):
    """Not enough free pages for an allocation; the cache is left exactly as it was."""


def kv_bytes_per_page(
    num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype
) -> int:
    """Bytes one page takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize


def pages_for_budget(
    budget_bytes: int,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int = DEFAULT_PAGE_SIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """How many pages fit in ``budget_bytes`` (e.g. free GPU memory minus a margin)."""
    per_page = kv_bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)
    pages = int(budget_bytes) // per_page
    if pages < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes} bytes holds no page ({per_page} bytes each)"
        )
    return pages


class PagedKVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        # One allocation for everything; per-layer K and V are views into it.
        self._storage = torch.zeros(
            2, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.k_caches: list[torch.Tensor] = list(self._storage[0].unbind(0))
        self.v_caches: list[torch.Tensor] = list(self._storage[1].unbind(0))
        self._free_pages: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._pages: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    @classmethod
    def for_model(
        cls,
        config,
        *,
        num_pages: int | None = None,
        budget_bytes: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> "PagedKVCache":
        """A cache shaped for a :class:`ModelConfig`, sized by ``num_pages`` or ``budget_bytes``."""
        if (num_pages is None) == (budget_bytes is None):
            raise ValueError("give exactly one of num_pages and budget_bytes")
        shape = dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
        if num_pages is None:
            num_pages = pages_for_budget(budget_bytes, page_size=page_size, dtype=dtype, **shape)
        return cls(num_pages=num_pages, page_size=page_size, dtype=dtype, device=device, **shape)

    def randomize_(self, std: float = 0.5, seed: int = 0) -> "PagedKVCache":
        """Fill every page with normal noise of ``std`` (seeded): benchmarks must not time
        attention over zeros. Page accounting is unchanged. Returns ``self``."""
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std!r}")
        generator = torch.Generator(device=self._storage.device).manual_seed(seed)
        self._storage.normal_(0.0, std, generator=generator)
        return self

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._pages

    def num_tokens(self, request_id: Hashable) -> int:
        """Tokens of ``request_id`` that have a slot (0 for an unknown request)."""
        return self._lengths.get(request_id, 0)

    def pages(self, request_id: Hashable) -> tuple[int, ...]:
        return tuple(self._pages.get(request_id, ()))

    def pages_needed(self, request_id: Hashable, n_tokens: int) -> int:
        """New pages that growing ``request_id`` by ``n_tokens`` tokens would take."""
        have = len(self._pages.get(request_id, ()))
        total = self.num_tokens(request_id) + n_tokens
        return max(0, -(-total // self.page_size) - have)

    def allocate(self, request_id: Hashable, n_tokens: int) -> None:
        """Grow ``request_id`` (new or known) by ``n_tokens`` slots, taking pages as needed."""
        self.allocate_many([(request_id, n_tokens)])

    def allocate_many(self, requests: Sequence[tuple[Hashable, int]]) -> None:
        """Grow several requests at once: all of them, or (on :class:`KVCacheExhausted`) none."""
        growth: dict[Hashable, int] = {}
        for request_id, n_tokens in requests:
            if n_tokens < 0:
                raise ValueError(f"request {request_id!r}: cannot allocate {n_tokens} tokens")
            growth[request_id] = growth.get(request_id, 0) + n_tokens
        needed = sum(self.pages_needed(r, n) for r, n in growth.items())
        if needed > len(self._free_pages):
            raise KVCacheExhausted(
                f"KV cache exhausted: {needed} pages requested ({sum(growth.values())} tokens for "
                f"{len(growth)} request(s), {self.page_size} tokens per page) but only "
                f"{len(self._free_pages)} of {self.num_pages} pages are free; finish or free "
                "requests, or size the cache larger"
            )
        for request_id, n_tokens in growth.items():
            new_pages = self.pages_needed(request_id, n_tokens)
            pages = self._pages.setdefault(request_id, [])
            pages.extend(self._free_pages.pop() for _ in range(new_pages))
            self._lengths[request_id] = self._lengths.get(request_id, 0) + n_tokens

    def free(self, request_id: Hashable) -> None:
        """Return the pages of ``request_id`` to the free list (its KV contents become garbage)."""
        self.give_back(self.detach(request_id))

    def detach(self, request_id: Hashable) -> list[int]:
        """Forget ``request_id`` and return its pages without freeing them: for a caller whose
        GPU work still writes them (a step in flight), to :meth:`give_back` once it is done."""
        if request_id not in self._pages:
            raise KeyError(f"request {request_id!r} holds no KV pages")
        del self._lengths[request_id]
        return self._pages.pop(request_id)

    def give_back(self, pages: list[int]) -> None:
        """Free pages from :meth:`detach`."""
        self._free_pages.extend(reversed(pages))
