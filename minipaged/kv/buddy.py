"""A buddy allocator over a range of token slots: how the paper's Orca baselines place KV slabs.

Paper §6.1: the Orca baselines "use the buddy allocation algorithm to determine the memory
address to store the KV cache". A buddy allocator hands out aligned power-of-two blocks:

* To serve a request of ``size`` slots it needs one free block of ``next_pow2(size)`` slots. If
  only larger blocks are free, it splits one in halves ("buddies") until a half has the right
  size.
* Like Linux's ``alloc_pages_exact``, it then gives the unused tail of that block straight back,
  as aligned power-of-two pieces, so a slab occupies exactly ``size`` slots. (Without this, every
  policy would round up to a power of two and the Oracle policy would behave like Pow2.)
* On free, a block whose buddy (``offset ^ size``) is free too merges with it, and so on upwards.

External fragmentation is then visible and real: free slots exist, but not as one aligned block
large enough for the next request. ``free_blocks()`` lists the free blocks so that the memory
accounting can say which of them could serve the next request.
"""

from __future__ import annotations


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1: callers have checked their sizes)."""
    assert n >= 1, n
    return 1 << (n - 1).bit_length()


class BuddyAllocator:
    """Aligned power-of-two blocks over slots ``[0, num_slots)``, no block larger than ``max_block``."""

    def __init__(self, num_slots: int, max_block: int | None = None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        largest = 1 << (num_slots.bit_length() - 1)  # largest power of two <= num_slots
        max_block = largest if max_block is None else max_block
        if max_block < 1 or max_block & (max_block - 1):
            raise ValueError(f"max_block must be a power of two >= 1, got {max_block}")
        self.num_slots = num_slots
        self.max_block = min(max_block, largest)
        # free_lists[size] holds the offsets of the free blocks of that size.
        self.free_lists: dict[int, set[int]] = {}
        self.num_free_slots = 0
        self.live: dict[int, int] = {}  # slabs handed out: offset -> size
        self._release_range(0, num_slots)

    # -- queries ---------------------------------------------------------------------------
    def block_size_for(self, size: int) -> int:
        """The aligned block a request of ``size`` slots needs; ValueError if it can never fit."""
        if size < 1:
            raise ValueError(f"an allocation needs >= 1 slot, got {size}")
        block = next_power_of_two(size)
        if block > self.max_block:
            raise ValueError(
                f"a slab of {size} slots needs an aligned block of {block} slots, but the largest "
                f"block this arena of {self.num_slots} slots can hold is {self.max_block}"
            )
        return block

    def can_allocate(self, size: int) -> bool:
        block = self.block_size_for(size)
        return any(s >= block and offsets for s, offsets in self.free_lists.items())

    def free_blocks(self) -> list[tuple[int, int]]:
        """All free blocks as ``(offset, size)``, sorted by offset."""
        return sorted((o, s) for s, offsets in self.free_lists.items() for o in offsets)

    # -- allocate / free -------------------------------------------------------------------
    def allocate(self, size: int) -> int | None:
        """Offset of a slab of exactly ``size`` slots, or None if no free block is large enough."""
        block = self.block_size_for(size)
        # Smallest free block that is large enough; the lowest address among those (deterministic).
        candidates = [s for s, offsets in self.free_lists.items() if s >= block and offsets]
        if not candidates:
            return None
        size_found = min(candidates)
        offset = min(self.free_lists[size_found])
        self.free_lists[size_found].remove(offset)
        self.num_free_slots -= size_found
        # Split: keep the lower half, free the upper half (the buddy), until the block fits.
        while size_found > block:
            size_found //= 2
            self._push(offset + size_found, size_found)
        # Give the unused tail of the block back, as alloc_pages_exact does.
        self._release_range(offset + size, offset + block)
        self.live[offset] = size
        return offset

    def free(self, offset: int, size: int) -> None:
        """Return the slab ``[offset, offset + size)`` that ``allocate`` handed out."""
        if self.live.get(offset) != size:
            raise ValueError(f"[{offset}, {offset + size}) is not a live slab (double free, or never allocated)")
        del self.live[offset]
        self._release_range(offset, offset + size)

    # -- internals -------------------------------------------------------------------------
    def _release_range(self, start: int, end: int) -> None:
        """Free ``[start, end)`` as the largest aligned power-of-two pieces, each coalesced."""
        while start < end:
            piece = self.max_block
            while start % piece or start + piece > end:
                piece //= 2
            self._coalesce(start, piece)
            start += piece

    def _coalesce(self, offset: int, size: int) -> None:
        while size < self.max_block:
            buddy = offset ^ size
            merged = min(offset, buddy)
            if merged + 2 * size > self.num_slots or buddy not in self.free_lists.get(size, ()):
                break
            self.free_lists[size].remove(buddy)
            self.num_free_slots -= size
            offset, size = merged, 2 * size
        self._push(offset, size)

    def _push(self, offset: int, size: int) -> None:
        self.free_lists.setdefault(size, set()).add(offset)
        self.num_free_slots += size
