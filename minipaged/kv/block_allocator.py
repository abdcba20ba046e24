"""Physical blocks of the paged cache: a free list and reference counts (paper §4.2-§4.5).

This is the paged cache's counterpart of ``buddy.py``. Where the buddy allocator must find one
aligned run of slots large enough for a whole slab, every block here is as good as any other:
a new block is simply the head of a free list (§4.2). Each block carries a *reference count*,
the number of block tables holding it, so that sequences can share blocks (fork, prefix-cache
hits, §4.4); a block goes back to the free list when its count drops to zero.

A block that the prefix cache (``minipaged.kv.prefix_cache``) holds does not go back to the free
list at zero: it stays *evictable*, still counted as free, and is evicted only when the free list
runs dry.

A ``BlockPool`` ties an allocator to the per-layer tensors it hands out blocks of and to the
block tables pointing into them: the paged cache has one pool on its device and one in CPU
memory for swapping (§4.5).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from minipaged.kv.prefix_cache import PrefixCache


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Blocks ``0 .. num_blocks - 1``: a free list, reference counts, and the prefix cache's evictable blocks."""

    def __init__(self, num_blocks: int, prefix_cache: PrefixCache) -> None:
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self.free_list: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.num_shared = 0  # blocks with a count > 1

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: never used, or cached but unreferenced (evictable)."""
        return len(self.free_list) + len(self.prefix_cache.evictable)

    def num_free_besides(self, hits: list[int]) -> int:
        """Free blocks left for new content once the prefix-cache ``hits`` are referenced again."""
        return self.num_free - sum(self.ref_counts[block] == 0 for block in hits)

    # -- allocate / share / release --------------------------------------------------------
    def allocate(self) -> int:
        """A block for new content (count 1); evicts the least recently freed cached block if needed."""
        assert self.num_free, "callers check num_free before allocating"
        block = self.free_list.popleft() if self.free_list else self.prefix_cache.evict()
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more reference to ``block`` (a fork, or a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            self.prefix_cache.revive(block)
        self.ref_counts[block] += 1
        self.num_shared += self.ref_counts[block] == 2

    def release(self, block: int) -> None:
        """One reference fewer; at zero the block is free (or evictable, if it is cached)."""
        self.ref_counts[block] -= 1
        self.num_shared -= self.ref_counts[block] == 1
        if self.ref_counts[block] == 0 and not self.prefix_cache.retire(block):
            self.free_list.append(block)


@dataclass
class BlockPool:
    """Blocks on one device: their allocator, their per-layer K/V tensors, and the block tables
    (sequence -> blocks of this pool) of the sequences whose K/V they hold.

    The pool owns its tables. A sequence's table lives in exactly one pool: the paged cache's
    ``block_tables`` *is* its device pool's ``tables`` (live sequences), and swapping moves a
    table to the CPU pool's ``tables`` and back.
    """

    allocator: BlockAllocator
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    name: str
    tables: dict[int, list[int]] = field(default_factory=dict)

    def free(self, seq_id: int) -> None:
        """Drop a sequence's table, releasing one reference to each of its blocks.

        Blocks are released last-first, so that among a prompt's cached blocks the tail is
        evicted before the head, which other prompts are more likely to share.
        """
        for block in reversed(self.tables.pop(seq_id)):
            self.allocator.release(block)
