"""Per-step metadata of a forward pass, planned on the CPU and padded to a shape bucket.

FlashInfer-style split: the ``plan_*`` functions (CPU, once per step) turn "which sequences,
how many cached and new tokens, which pages" into a :class:`ForwardBatch` of tensors; the model
forward only reads those tensors, so it can be captured in a CUDA graph per bucket and replayed
after :meth:`ForwardBatch.copy_into` refreshes the graph's static buffers.

A bucket is ``(is_decode, num_tokens, batch_size, max_pages)``; every tensor's shape follows
from it. Padding is inert: padding tokens have slot ``-1`` (their K/V is not written) and
padding sequences have ``seq_len == 0`` and no query tokens (their attention output is zero).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np
import torch


class Bucket(NamedTuple):
    is_decode: bool
    num_tokens: int
    batch_size: int
    max_pages: int


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """One sequence's work in a step: ``num_new`` tokens after ``num_cached`` cached ones.

    ``pages`` are the sequence's KV pages in order and must cover ``num_cached + num_new`` tokens.
    """

    pages: Sequence[int]
    num_cached: int
    num_new: int


@dataclasses.dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64, absolute position of each token (0 for padding)
    slot_mapping: torch.Tensor  # [T] int64, page * page_size + offset; -1 = padding
    page_table: torch.Tensor  # [B, max_pages] int32, page ids of each sequence (0-filled)
    seq_lens: torch.Tensor  # [B] int32, KV length including this step's tokens; 0 = padding
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's tokens in the T rows
    logits_indices: torch.Tensor  # [B] int64, row of each sequence's last token
    is_decode: bool  # one token per sequence (T == B); fixed per captured graph
    # The bucket's page-table width. A planned batch holds only the columns its sequences use
    # (kernels read no page past a sequence's length): at a 128k context the full table of a
    # 128-row decode step is 4 MB, copied every step for a few dozen pages per row.
    # None: the table's own width.
    max_pages: int | None = None

    def __post_init__(self):
        width = self.page_table.shape[1]
        if self.max_pages is None:
            self.max_pages = width
        elif width > self.max_pages:
            raise ValueError(f"a page table of {width} columns is wider than the bucket's {self.max_pages}")

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.is_decode, self.positions.shape[0], self.page_table.shape[0], self.max_pages)

    @classmethod
    def padding(
        cls, bucket: Bucket, device: torch.device | str | None = None
    ) -> "ForwardBatch":
        """An all-padding batch of ``bucket``: the static buffers a CUDA graph is captured on."""
        is_decode, t, b, p = bucket
        if is_decode and t != b:
            raise ValueError(f"a decode bucket has one token per sequence, got {t} tokens for {b}")
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        return cls(
            positions=torch.zeros(t, **i64),
            slot_mapping=torch.full((t,), -1, **i64),
            page_table=torch.zeros(b, p, **i32),
            seq_lens=torch.zeros(b, **i32),
            cu_seqlens_q=torch.zeros(b + 1, **i32),
            logits_indices=torch.zeros(b, **i64),
            is_decode=is_decode,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("is_decode", "max_pages")}

    def to(self, device, non_blocking: bool = False) -> "ForwardBatch":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        return ForwardBatch(**moved, is_decode=self.is_decode, max_pages=self.max_pages)

    def pin_memory(self) -> "ForwardBatch":
        """A page-locked copy, so :meth:`copy_into` a GPU batch does not block the host."""
        pinned = {k: v.pin_memory() for k, v in self.tensors().items()}
        return ForwardBatch(**pinned, is_decode=self.is_decode, max_pages=self.max_pages)

    def pad_to(self, num_tokens: int, batch_size: int) -> "ForwardBatch":
        """This batch padded with inert rows to ``num_tokens`` tokens and ``batch_size`` sequences
        (a bucket's shape); a new batch on the same device."""
        is_decode, t, b, p = self.bucket
        if num_tokens < t or batch_size < b:
            raise ValueError(
                f"cannot pad a batch of {b} sequences and {t} tokens to {batch_size} sequences and "
                f"{num_tokens} tokens: padding only grows a batch"
            )
        out = ForwardBatch.padding(Bucket(is_decode, num_tokens, batch_size, self.page_table.shape[1]),
                                   self.positions.device)
        out.max_pages = p
        for name in ("positions", "slot_mapping"):
            getattr(out, name)[:t] = getattr(self, name)
        for name in ("page_table", "seq_lens", "logits_indices"):
            getattr(out, name)[:b] = getattr(self, name)
        out.cu_seqlens_q[: b + 1] = self.cu_seqlens_q
        out.cu_seqlens_q[b + 1 :] = self.cu_seqlens_q[b]  # padding sequences own no query rows
        return out

    def copy_into(self, static: "ForwardBatch") -> None:
        """Copy every value into ``static`` (same bucket), e.g. a captured graph's input buffers."""
        if static.bucket != self.bucket:
            raise ValueError(
                f"cannot copy a batch of bucket {self.bucket} into static buffers of {static.bucket}"
            )
        for name, src in self.tensors().items():
            dst = getattr(static, name)
            if name == "page_table":  # only the columns planned; the rest are never read
                dst = dst[:, : src.shape[1]]
            dst.copy_(src, non_blocking=True)


def plan_prefill(
    chunks: Sequence[SeqChunk],
    *,
    page_size: int,
    max_pages: int,
    num_tokens: int | None = None,
    batch_size: int | None = None,
) -> ForwardBatch:
    """A prefill batch (ragged, each sequence may continue a cached prefix), padded to the bucket
    ``(num_tokens, batch_size)``; ``None`` means "exactly as many as needed"."""
    return _plan(chunks, False, num_tokens, batch_size, page_size, max_pages)


def plan_decode(
    chunks: Sequence[SeqChunk], *, page_size: int, max_pages: int, batch_size: int | None = None
) -> ForwardBatch:
    """A decode batch (one new token per sequence), padded to ``batch_size`` sequences."""
    if any(c.num_new != 1 for c in chunks):
        raise ValueError("decode takes exactly one new token per sequence")
    return _plan(chunks, True, batch_size, batch_size, page_size, max_pages)


def pack_input_ids(token_lists: Sequence[Sequence[int]], num_tokens: int) -> torch.Tensor:
    """The token ids back to back, zero-padded to ``num_tokens``: ``[num_tokens]`` int64."""
    flat = [t for tokens in token_lists for t in tokens]
    if len(flat) > num_tokens:
        raise ValueError(f"{len(flat)} tokens do not fit a bucket of {num_tokens}")
    return torch.tensor(flat + [0] * (num_tokens - len(flat)), dtype=torch.int64)


def pad_input_ids(input_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``input_ids`` zero-padded to ``num_tokens`` (what :meth:`ForwardBatch.pad_to` pads the batch to)."""
    if input_ids.shape[0] > num_tokens:
        raise ValueError(f"{input_ids.shape[0]} tokens do not fit a bucket of {num_tokens}")
    return torch.nn.functional.pad(input_ids, (0, num_tokens - input_ids.shape[0]))


def _plan(chunks, is_decode, num_tokens, batch_size, page_size, max_pages) -> ForwardBatch:
    # Built in numpy and wrapped once: a step plans every few milliseconds, and per-sequence
    # torch calls cost about 1 ms per step at batch 32 (measured in the serving loop on the H200).
    real_tokens = sum(c.num_new for c in chunks)
    num_tokens = real_tokens if num_tokens is None else num_tokens
    batch_size = len(chunks) if batch_size is None else batch_size
    if real_tokens > num_tokens or len(chunks) > batch_size:
        raise ValueError(
            f"{len(chunks)} sequences with {real_tokens} tokens do not fit the bucket of "
            f"{batch_size} sequences and {num_tokens} tokens"
        )
    if is_decode and num_tokens != batch_size:
        raise ValueError(f"a decode bucket has one token per sequence, got {num_tokens} tokens for {batch_size}")
    positions = np.zeros(num_tokens, np.int64)
    slot_mapping = np.full(num_tokens, -1, np.int64)
    used = max((len(c.pages) for c in chunks), default=1)
    page_table = np.zeros((batch_size, max(used, 1)), np.int32)  # the columns in use (see max_pages)
    seq_lens = np.zeros(batch_size, np.int32)
    cu_seqlens_q = np.zeros(batch_size + 1, np.int32)
    logits_indices = np.zeros(batch_size, np.int64)
    offset = 0
    for b, c in enumerate(chunks):
        end = c.num_cached + c.num_new
        if c.num_new < 1 or c.num_cached < 0:
            raise ValueError(f"sequence {b}: needs at least one new token, got {c}")
        if len(c.pages) * page_size < end or len(c.pages) > max_pages:
            raise ValueError(
                f"sequence {b}: {len(c.pages)} pages of {page_size} for {end} tokens "
                f"(at most {max_pages} pages per sequence)"
            )
        page_table[b, : len(c.pages)] = c.pages
        if c.num_new == 1:  # decode rows: no arrays needed
            positions[offset] = end - 1
            slot_mapping[offset] = c.pages[(end - 1) // page_size] * page_size + (end - 1) % page_size
        else:
            pos = np.arange(c.num_cached, end)
            positions[offset:offset + c.num_new] = pos
            slot_mapping[offset:offset + c.num_new] = page_table[b, pos // page_size].astype(np.int64) * page_size + pos % page_size
        seq_lens[b] = end
        offset += c.num_new
        logits_indices[b] = offset - 1
        cu_seqlens_q[b + 1] = offset
    cu_seqlens_q[len(chunks) + 1 :] = offset  # padding sequences own no query rows
    return ForwardBatch(
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slot_mapping),
        page_table=torch.from_numpy(page_table),
        seq_lens=torch.from_numpy(seq_lens),
        cu_seqlens_q=torch.from_numpy(cu_seqlens_q),
        logits_indices=torch.from_numpy(logits_indices),
        is_decode=is_decode,
        max_pages=max_pages,
    )
