"""The contiguous KV cache: the pre-PagedAttention baseline whose waste the paper measures (§3, §6.1).

Before vLLM, serving systems stored each request's K/V in one contiguous *slab* of the KV
space, sized when the request is admitted, because attention kernels wanted a sequence's
keys in one run of memory. The request's final length is unknown at admission, so the slab
must be *reserved* for the worst case. The paper's Orca baselines differ only in how much
they reserve (§6.1):

* ``max``: the model's maximum sequence length, whatever the request;
* ``pow2``: the prompt plus the next power of two of the request's true *output* length ("if
  the true output length is 25, it reserves 32 positions for outputs", §6.1), so at most 2x
  too much for the output;
* ``oracle``: exactly the true total length (an impossible ideal: it knows the future).

A policy of your own is a function ``reservation(num_tokens, final_len) -> slots`` passed in
place of the name (notebook 7's exercise); the cache checks that it reserves at least
``final_len`` and at most ``max_seq_len`` slots.

Slabs are carved out of one arena per layer (``[num_slots, num_kv_heads, head_dim]``) by a
buddy allocator (``minipaged.kv.buddy``), as in the paper. This is where Figure 2's waste comes
from: reserved slots not yet used (*reservation*), reserved slots never used (*internal
fragmentation*) and free slots in pieces too small for the next request (*external
fragmentation*).

A sequence's slab is a run of consecutive slots, so addressing is ``slot = start + position``:
the attention kernel takes a start and a length per sequence instead of a block table (the
arena is the paged layout with a block size of one slot).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from minipaged.kv.accounting import Extent
from minipaged.kv.base import KVCache, KVCacheFull, check_positive
from minipaged.kv.buddy import BuddyAllocator, next_power_of_two

RESERVATIONS = ("max", "pow2", "oracle")


class ContiguousKVCache(KVCache):
    """One slab per sequence in an arena of ``num_slots`` token slots, reserved up front."""

    def __init__(
        self,
        num_slots: int,
        reservation: str | Callable[[int, int], int] = "max",
        *,
        num_layers: int = 1,
        num_kv_heads: int = 1,
        head_dim: int = 1,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        max_seq_len: int = 2048,
    ) -> None:
        check_positive("num_slots", num_slots)
        if not callable(reservation) and reservation not in RESERVATIONS:
            raise ValueError(f"reservation must be one of {RESERVATIONS} or a function, got {reservation!r}")
        super().__init__((num_slots,), num_layers, num_kv_heads, head_dim, dtype, device, max_seq_len)
        self.num_slots, self.reservation = num_slots, reservation
        self.buddy = BuddyAllocator(num_slots)
        self.slabs: dict[int, tuple[int, int]] = {}  # live sequence -> (start slot, reserved slots)
        # Swapped-out sequences: their reserved size and their tokens' rows of every K then V tensor, on the CPU.
        self._swap_space: dict[int, tuple[int, list[torch.Tensor]]] = {}

    @property
    def block_size(self) -> int:
        return 1

    @property
    def capacity(self) -> int:
        return self.num_slots

    def slab(self, seq_id: int) -> tuple[int, int]:
        """``(start slot, reserved slots)`` of a live sequence."""
        self._check_live(seq_id)
        return self.slabs[seq_id]

    def reserved_slots(self, num_tokens: int, final_len: int | None, token_ids: list[int] | None = None) -> int:
        """How many slots the policy reserves for a request (and checks it can ever fit)."""
        self._check_request(num_tokens, final_len, token_ids)
        if self.reservation == "max":
            size = self.max_seq_len
        elif final_len is None:
            raise ValueError(f"reservation {self.reservation!r} needs the request's final_len")
        elif callable(self.reservation):
            size = self.reservation(num_tokens, final_len)
            if isinstance(size, bool) or not isinstance(size, int) or not final_len <= size <= self.max_seq_len:
                raise ValueError(f"the reservation policy reserved {size!r} slots for a request of {final_len} "
                                 f"tokens: it must reserve an integer from final_len to max_seq_len={self.max_seq_len}")
        elif self.reservation == "pow2" and final_len > num_tokens:
            # The prompt is at most max_seq_len, so the cap keeps size >= final_len.
            size = min(num_tokens + next_power_of_two(final_len - num_tokens), self.max_seq_len)
        else:  # oracle, or pow2 with no output to reserve for
            size = final_len
        self.buddy.block_size_for(size)  # ValueError if the arena can never hold it
        return size

    # -- allocate / append / free ----------------------------------------------------------
    def can_allocate(self, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None,
                     width: int = 1) -> bool:
        size = self.reserved_slots(num_tokens, final_len, token_ids)
        return self.buddy.can_allocate(size) if width == 1 else _fits(self.buddy, [size] * width)  # a slab each

    def allocate(
        self, seq_id: int, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None
    ) -> int:
        """Reserve a slab for the whole request; returns 0 (no prefix caching in this design)."""
        self._check_new(seq_id)
        self._place(seq_id, self.reserved_slots(num_tokens, final_len, token_ids))
        self._num_tokens[seq_id], self._final_len[seq_id] = num_tokens, final_len
        return 0

    def _place(self, seq_id: int, size: int) -> None:
        start = self.buddy.allocate(size)
        if start is None:
            raise KVCacheFull(
                f"no free block of {self.buddy.block_size_for(size)} slots for a slab of {size} "
                f"({self.buddy.num_free_slots} slots free in smaller pieces)"
            )
        self.slabs[seq_id] = (start, size)

    def can_allocate_many(self, requests: list[tuple[int, int | None, list[int] | None]]) -> bool:
        return _fits(self.buddy, [self.reserved_slots(*request) for request in requests])

    def can_ever_hold(self, count: int, num_tokens: int, final_len: int | None = None) -> bool:
        return _fits(BuddyAllocator(self.num_slots), [self.reserved_slots(num_tokens, final_len)] * count)

    def can_append_many(self, appends: dict[int, int]) -> bool:
        for seq_id, num_tokens in appends.items():
            self._check_growth(seq_id, num_tokens)
        return True  # each slab was reserved for the whole request

    def append_slots(
        self, seq_id: int, num_tokens: int = 1, token_ids: list[int] | None = None
    ) -> list[tuple[int, int]]:
        """Use ``num_tokens`` more slots of the slab; never copies (returns no copy-on-write pairs)."""
        self._num_tokens[seq_id] = self._check_growth(seq_id, num_tokens, token_ids)
        return []

    def free(self, seq_id: int) -> None:
        if seq_id in self._swapped:
            del self._swapped[seq_id]
            del self._swap_space[seq_id]
        else:
            self._check_live(seq_id)
            self.buddy.free(*self.slabs.pop(seq_id))
            del self._num_tokens[seq_id]
        del self._final_len[seq_id]

    def fork(self, parent_id: int, child_id: int) -> None:
        """A child needs a slab of its own and a copy of the parent's K/V: nothing can be shared."""
        self._check_live(parent_id)
        self._check_new(child_id)
        start, size = self.slabs[parent_id]
        self._place(child_id, size)
        n, child_start = self._num_tokens[parent_id], self.slabs[child_id][0]
        for cache in self.k_caches + self.v_caches:
            cache[child_start:child_start + n] = cache[start:start + n]
        self._num_tokens[child_id], self._final_len[child_id] = self._num_tokens[parent_id], self._final_len[parent_id]

    # -- swapping --------------------------------------------------------------------------
    def swap_out(self, seq_ids: list[int]) -> None:
        """Copy sequences' tokens to CPU memory and give their slabs back to the arena.

        Unlike the paged cache's fixed pool of CPU blocks, this swap space has no size limit:
        each swapped sequence keeps its own CPU tensors.
        """
        self._check_group(seq_ids, swapped=False)
        pin = self.device.type == "cuda"
        for seq_id in seq_ids:
            (start, size), n = self.slabs.pop(seq_id), self._num_tokens.pop(seq_id)
            saved = [cache[start:start + n].to("cpu", copy=True) for cache in self.k_caches + self.v_caches]
            self._swap_space[seq_id] = (size, [t.pin_memory() for t in saved] if pin else saved)
            self.buddy.free(start, size)
            self._swapped[seq_id] = n

    def swap_in(self, seq_ids: list[int]) -> None:
        """Reserve new slabs and copy the tokens back; KVCacheFull (nothing changed) if they do not fit."""
        self._check_group(seq_ids, swapped=True)
        placed = []
        try:
            for seq_id in seq_ids:
                self._place(seq_id, self._swap_space[seq_id][0])
                placed.append(seq_id)
        except KVCacheFull:
            for seq_id in placed:
                self.buddy.free(*self.slabs.pop(seq_id))
            raise
        for seq_id in seq_ids:
            _, saved_rows = self._swap_space.pop(seq_id)
            start, n = self.slabs[seq_id][0], self._swapped.pop(seq_id)
            for cache, saved in zip(self.k_caches + self.v_caches, saved_rows):
                cache[start:start + n] = saved.to(self.device)
            self._num_tokens[seq_id] = n

    def blocks_in_use(self) -> tuple[int, int]:
        reserved = sum(size for _, size in self.slabs.values())
        return reserved, reserved  # nothing is shared

    # -- addressing and accounting ---------------------------------------------------------
    def _kernel_addressing(self, seq_ids: list[int], max_len: int) -> np.ndarray:
        """The start slot of each slab."""
        slabs = self.slabs
        return np.array([slabs[s][0] for s in seq_ids], dtype=np.int32)

    def _slots(self, addressing: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return addressing[rows].astype(np.int64) + positions

    def _extents(self) -> list[Extent]:
        extents = []
        for seq_id, (_, slots) in self.slabs.items():
            extents.append(Extent(slots, self._num_tokens[seq_id], min(self._final_len[seq_id] or slots, slots)))
        return extents

    def _free_slots(self, next_request: tuple[int, int | None] | None) -> tuple[int, int]:
        free = self.buddy.num_free_slots
        if next_request is None:
            return free, free
        needed = self.buddy.block_size_for(self.reserved_slots(*next_request))
        return free, sum(size for _, size in self.buddy.free_blocks() if size >= needed)


def _fits(buddy: BuddyAllocator, sizes: list[int]) -> bool:
    """Could ``buddy`` place slabs of these sizes one after the other now? (Tried, then undone.)"""
    placed = []
    try:
        for size in sizes:
            start = buddy.allocate(size)
            if start is None:
                return False
            placed.append((start, size))
        return True
    finally:
        for start, size in placed:
            buddy.free(start, size)
