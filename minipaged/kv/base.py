"""What the contiguous and the paged KV cache share (paper §3 and §4).

Both caches keep, per layer, one key tensor and one value tensor, and address them by *slot*:
the index of one token's K/V row when the cache is seen as a flat array of rows. Writing the
K/V of new tokens is a scatter to their slots (``slot_mapping``); reading a sequence back is a
gather through the slots of its positions. Only the *mapping* from a sequence's positions to
slots differs between the two designs:

* contiguous (``ContiguousKVCache``): slot = start of the sequence's slab + position;
* paged (``PagedKVCache``): slot = block_table[position // block_size] * block_size
  + position % block_size.

So this class holds the tensors and the per-sequence lengths, and implements writing, reading,
input checks and the memory breakdown once; the subclasses implement allocation and the mapping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from minipaged import ops
from minipaged.kv.accounting import Extent, MemoryBreakdown, breakdown
from minipaged.ops.metadata import AttentionMetadata, HostMetadata


class KVCacheFull(RuntimeError):
    """The cache cannot take this allocation *now* (try again after something is freed).

    Not an input error: the request is valid and would fit in an emptier cache. The cache is
    left exactly as it was.
    """


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class KVCache(ABC):
    """Per-layer K/V tensors addressed by slot, and the lengths of the sequences living in them."""

    def __init__(
        self,
        shape: tuple[int, ...],
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_seq_len: int,
    ) -> None:
        for name, value in [("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_seq_len", max_seq_len)]:
            check_positive(name, value)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_seq_len = dtype, torch.device(device), max_seq_len
        full_shape = (*shape, num_kv_heads, head_dim)
        self.k_caches = [torch.zeros(full_shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(full_shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._num_tokens: dict[int, int] = {}  # live sequences (in the cache) -> tokens stored
        self._final_len: dict[int, int | None] = {}  # every known sequence -> true final length
        self._swapped: dict[int, int] = {}  # swapped-out sequences (K/V in CPU memory) -> tokens

    # -- what each design provides: the one interface of both caches -----------------------
    @property
    @abstractmethod
    def capacity(self) -> int:
        """Total token slots of the KV space (on the cache's device)."""

    @property
    def uses_token_ids(self) -> bool:
        """Does the cache read the token ids passed to ``allocate``/``append_slots`` (prefix caching)?
        When it does not, a caller may pass None and save the cache checking them."""
        return False

    @property
    @abstractmethod
    def block_size(self) -> int:
        """Slots per block (1 for the contiguous cache, whose blocks are single slots)."""

    @abstractmethod
    def can_allocate(self, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None,
                     width: int = 1) -> bool:
        """Would ``allocate`` succeed now, and with ``width > 1`` would the ``width`` sequences
        forked from it (parallel samples, beams) fit too, once each writes its first token?
        ValueError for a request no state of the cache could hold."""

    @abstractmethod
    def allocate(
        self, seq_id: int, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None
    ) -> int:
        """Memory for a new sequence whose prompt has ``num_tokens`` tokens; ``final_len`` is its
        true final length when known. Returns how many prompt tokens are already cached.
        KVCacheFull (nothing changed) when it does not fit now."""

    @abstractmethod
    def can_allocate_many(self, requests: list[tuple[int, int | None, list[int] | None]]) -> bool:
        """Would ``allocate`` succeed now for each of ``requests`` (``(num_tokens, final_len,
        token_ids)``), one after the other? (A group of sequences is admitted whole.)"""

    @abstractmethod
    def can_ever_hold(self, count: int, num_tokens: int, final_len: int | None = None) -> bool:
        """Could an empty cache hold ``count`` sequences of ``num_tokens`` tokens each, shared nothing?"""

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Would ``append_slots`` succeed now?"""
        return self.can_append_many({seq_id: num_tokens})

    @abstractmethod
    def can_append_many(self, appends: dict[int, int]) -> bool:
        """Would ``append_slots(seq_id, n)`` succeed for every ``seq_id: n`` of ``appends``, one
        after the other? (A group's sequences grow together.)"""

    @abstractmethod
    def append_slots(
        self, seq_id: int, num_tokens: int = 1, token_ids: list[int] | None = None
    ) -> list[tuple[int, int]]:
        """Room for ``num_tokens`` more tokens; returns the copy-on-write ``(src, dst)`` block copies made."""

    @abstractmethod
    def fork(self, parent_id: int, child_id: int) -> None:
        """A new sequence ``child_id`` holding the same tokens as ``parent_id``."""

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Forget a sequence (live or swapped out) and give its memory back."""

    @abstractmethod
    def swap_out(self, seq_ids: list[int]) -> None:
        """Move sequences' K/V to CPU memory and free their memory on the cache's device."""

    @abstractmethod
    def swap_in(self, seq_ids: list[int]) -> None:
        """Bring swapped-out sequences back; KVCacheFull (nothing changed) when they do not fit."""

    @abstractmethod
    def blocks_in_use(self) -> tuple[int, int]:
        """``(blocks in the block tables of live sequences, counting a shared block once per table;
        distinct blocks in use)``: the first is what the sequences would hold without sharing.
        (The contiguous cache's blocks are its slabs' slots.)"""

    @abstractmethod
    def _kernel_addressing(self, seq_ids: list[int], max_len: int) -> np.ndarray:
        """How the kernels find live sequences' tokens (int32): their block tables ``[len(seq_ids),
        blocks of max_len]`` (paged), or each slab's first slot ``[len(seq_ids)]`` (contiguous);
        ``max_len`` is the most tokens any of them holds. ``attention_metadata`` sends it to the device."""

    @abstractmethod
    def _slots(self, addressing: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """int64 slots of ``positions``, each of the sequence at that row of ``addressing`` (the one
        place the two designs differ: see the module docstring). Whole arrays at once: a step of
        256 sequences computes its slots in a few numpy operations, not a Python loop."""

    @abstractmethod
    def _extents(self) -> list[Extent]:
        """Allocated memory, for the breakdown."""

    @abstractmethod
    def _free_slots(self, next_request: tuple[int, int | None] | None) -> tuple[int, int]:
        """(free slots, free slots that could serve ``next_request``)."""

    # -- sequences -------------------------------------------------------------------------
    @property
    def seq_ids(self) -> list[int]:
        """Sequences whose K/V is in the cache (not swapped out)."""
        return list(self._num_tokens)

    def num_tokens(self, seq_id: int) -> int:
        self._check_live(seq_id)
        return self._num_tokens[seq_id]

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self._swapped

    def slot_mapping(self, seq_id: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """int64 slots of positions ``[start, end)`` (default: all of them) of a live sequence."""
        self._check_live(seq_id)
        n = self._num_tokens[seq_id]
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"positions [{start}, {end}) must lie within [0, {n}] for sequence {seq_id}")
        positions = np.arange(start, end)
        slots = self._slots(self._kernel_addressing([seq_id], n), np.zeros_like(positions), positions)
        return torch.from_numpy(slots).to(self.device)

    def attention_metadata(self, seq_ids: list[int], num_new_tokens: list[int]) -> AttentionMetadata:
        """What the kernels need for one step in which sequence ``seq_ids[i]`` brings its last
        ``num_new_tokens[i]`` tokens (already allocated: after ``allocate``/``append_slots``).

        Built once per step on the host, in one pass, sent to the device in one copy, then shared
        by every layer.
        """
        return self.host_metadata(seq_ids, num_new_tokens).to_device(self.device)[0]

    def host_metadata(self, seq_ids: list[int], num_new_tokens: list[int]) -> HostMetadata:
        """``attention_metadata`` still on the host, as numpy arrays."""
        if not seq_ids:
            raise ValueError("seq_ids must name at least one sequence")
        if len(num_new_tokens) != len(seq_ids):
            raise ValueError(f"num_new_tokens has {len(num_new_tokens)} entries for {len(seq_ids)} sequences")
        context_lens = [self._num_tokens.get(seq_id) for seq_id in seq_ids]
        for seq_id, n, new in zip(seq_ids, context_lens, num_new_tokens):
            if n is None or type(new) is not int or not 1 <= new <= n:
                self._check_live(seq_id)
                raise ValueError(f"sequence {seq_id} holds {n} tokens: its new tokens must number 1..{n}, got {new}")
        num_seqs, max_len = len(seq_ids), max(context_lens)
        addressing = self._kernel_addressing(seq_ids, max_len)
        # Every new token's sequence (its row of ``addressing``) and position, then its slot.
        lens = np.array(context_lens)
        if sum(num_new_tokens) == num_seqs:  # decode: one token each, the last
            rows, positions, query_start_loc = np.arange(num_seqs), lens - 1, None
        else:
            new = np.array(num_new_tokens)
            query_start_loc = np.concatenate([[0], np.cumsum(new)])
            rows = np.repeat(np.arange(num_seqs), new)
            positions = np.arange(query_start_loc[-1]) + np.repeat(lens - new - query_start_loc[:-1], new)
        return HostMetadata(
            slot_mapping=self._slots(addressing, rows, positions),
            context_lens=lens,
            query_start_loc=query_start_loc,
            addressing=addressing,
            max_context_len=max_len,
            max_query_len=max(num_new_tokens),
        )

    def _check_live(self, seq_id: int) -> None:
        if seq_id not in self._num_tokens:
            state = "is swapped out" if seq_id in self._swapped else "is not in the cache"
            raise ValueError(f"sequence {seq_id} {state}; live sequences: {sorted(self._num_tokens)}")

    def _check_new(self, seq_id: int) -> None:
        if seq_id in self._final_len:
            raise ValueError(f"sequence id {seq_id} is already in use")

    def _check_group(self, seq_ids: list[int], swapped: bool) -> None:
        """Distinct sequences, all live (``swapped=False``) or all swapped out."""
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids}")
        for seq_id in seq_ids:
            if not swapped:
                self._check_live(seq_id)
            elif seq_id not in self._swapped:
                raise ValueError(f"sequence {seq_id} is not swapped out; swapped: {sorted(self._swapped)}")

    def _check_request(self, num_tokens: int, final_len: int | None, token_ids: list[int] | None) -> None:
        check_positive("num_tokens", num_tokens)
        if num_tokens > self.max_seq_len:
            raise ValueError(f"a prompt of {num_tokens} tokens exceeds max_seq_len={self.max_seq_len}")
        if final_len is not None:
            check_positive("final_len", final_len)
            if not num_tokens <= final_len <= self.max_seq_len:
                raise ValueError(
                    f"final_len must be between the prompt length ({num_tokens}) and "
                    f"max_seq_len ({self.max_seq_len}), got {final_len}"
                )
        self._check_token_ids(token_ids, num_tokens)

    @staticmethod
    def _check_token_ids(token_ids: list[int] | None, num_tokens: int) -> None:
        if token_ids is None:
            return
        if len(token_ids) != num_tokens:
            raise ValueError(f"token_ids has {len(token_ids)} entries, expected {num_tokens}")
        if not all(isinstance(t, int) for t in token_ids):
            raise ValueError("token_ids must be integers")

    def _check_growth(self, seq_id: int, num_tokens: int, token_ids: list[int] | None = None) -> int:
        """Validate an append of ``num_tokens``; return the new length. (Every running sequence
        appends every step: the checks that pass cost a lookup and a comparison each.)"""
        num_cached = self._num_tokens.get(seq_id)
        if num_cached is None:
            self._check_live(seq_id)
        if type(num_tokens) is not int or num_tokens < 1:
            check_positive("num_tokens", num_tokens)
        if token_ids is not None:
            self._check_token_ids(token_ids, num_tokens)
        new_len = num_cached + num_tokens
        limit = self._final_len[seq_id] or self.max_seq_len
        if new_len > limit:
            what = "final_len" if self._final_len[seq_id] else "max_seq_len"
            raise ValueError(f"sequence {seq_id} would grow to {new_len} tokens, past its {what} of {limit}")
        return new_len

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")

    # -- K/V data --------------------------------------------------------------------------
    def _blocks(self, cache: torch.Tensor) -> torch.Tensor:
        """A layer's tensor as ``[num_blocks, block_size, H_kv, D]`` (a view), the kernels' layout."""
        return cache.view(-1, self.block_size, self.num_kv_heads, self.head_dim)

    def _destination(self, layer: int, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where a write of layer ``layer`` goes: its K and V as blocks, and the slots on the cache's device."""
        self._check_layer(layer)
        slots = slot_mapping.to(device=self.device, dtype=torch.int64)
        return self._blocks(self.k_caches[layer]), self._blocks(self.v_caches[layer]), slots

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the K/V of ``len(slot_mapping)`` tokens (each ``[T, H_kv, D]``) in their slots,
        in the cache's dtype. Shapes are checked once, by ``ops.write_to_cache``."""
        ops.write_to_cache(key.to(self.dtype), value.to(self.dtype), *self._destination(layer, slot_mapping))

    def write_rotated(
        self,
        layer: int,
        slot_mapping: torch.Tensor,
        q: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """``write`` with the rotary embedding in the same kernel (``ops.rotary_and_write``), the
        model's write for every layer: the keys are stored turned by their tokens' ``positions``
        (rounded to their dtype, then stored in the cache's, as ``write`` would store them), and
        ``q [T, H, D]`` is turned in place and returned."""
        return ops.rotary_and_write(q, key, value, cos, sin, positions, *self._destination(layer, slot_mapping))

    def read(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's keys and values, ``[num_tokens, H_kv, D]`` each, gathered through its slots."""
        self._check_layer(layer)
        slots = self.slot_mapping(seq_id)
        rows = (-1, self.num_kv_heads, self.head_dim)
        return self.k_caches[layer].view(rows)[slots], self.v_caches[layer].view(rows)[slots]

    # -- accounting ------------------------------------------------------------------------
    def memory_breakdown(self, next_request: tuple[int, int | None] | None = None) -> MemoryBreakdown:
        """The Figure 2 categories now (see ``minipaged.kv.accounting`` for the definitions).

        ``next_request`` is ``(prompt_len, final_len)`` of the request waiting at the head of the
        queue, or None when none waits (a request that can never fit raises ValueError, as
        ``can_allocate`` does).
        """
        free, servable = self._free_slots(next_request)
        return breakdown(self._extents(), free, servable)
