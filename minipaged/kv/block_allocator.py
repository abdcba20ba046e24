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

import numpy as np
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


class TableRows:
    """The block tables once more, each as a row of one int32 array: the layout the attention
    kernels read (``AttentionMetadata.block_tables``), kept up to date as the tables change.

    A step hands the kernels the tables of every sequence it runs. Built from the lists, that is a
    Python loop over every block of every sequence, every step (a 256-sequence step of 16-block
    tables: 4,096 integers, ~0.2 ms of host time). A table changes only when a block is added or
    replaced, once per ``block_size`` tokens, so the pool rewrites a sequence's row then, and a
    step's tables are one gather of rows (``take``). vLLM keeps its block tables the same way.
    """

    def __init__(self, width: int) -> None:
        self.array = np.zeros((0, width), dtype=np.int32)  # row r: a table, padded with block 0 (never read)
        self.row: dict[int, int] = {}  # sequence -> its row
        self.free_rows: list[int] = []

    def put(self, seq_id: int, table: list[int]) -> None:
        """Write a sequence's table into its row (taking a row when it has none)."""
        row = self.row.get(seq_id)
        if row is None:
            if not self.free_rows:  # twice the rows, so that rows are taken in amortised O(1)
                old = len(self.array)
                self.array = np.concatenate([self.array, np.zeros((max(old, 16), self.array.shape[1]), np.int32)])
                self.free_rows = list(range(len(self.array) - 1, old - 1, -1))
            row = self.row[seq_id] = self.free_rows.pop()
        self.array[row, : len(table)] = table

    def drop(self, seq_id: int) -> None:
        self.free_rows.append(self.row.pop(seq_id))

    def take(self, seq_ids: list[int], width: int) -> np.ndarray:
        """The tables of ``seq_ids``, ``[len(seq_ids), width]``, row after row."""
        row = self.row
        return self.array[[row[seq_id] for seq_id in seq_ids], :width]


@dataclass
class BlockPool:
    """Blocks on one device: their allocator, their per-layer K/V tensors, and the block tables
    (sequence -> blocks of this pool) of the sequences whose K/V they hold.

    The pool owns its tables. A sequence's table lives in exactly one pool: the paged cache's
    ``block_tables`` *is* its device pool's ``tables`` (live sequences), and swapping moves a
    table to the CPU pool's ``tables`` and back. The device pool also keeps the kernels' copy of
    its tables (``rows``): a table is set with ``set_table`` and, once changed in place, handed
    to ``changed``, so that its row follows.
    """

    allocator: BlockAllocator
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    name: str
    tables: dict[int, list[int]] = field(default_factory=dict)
    rows: TableRows | None = None  # the kernels' copy of the tables (the device pool's)

    def set_table(self, seq_id: int, table: list[int]) -> None:
        self.tables[seq_id] = table
        self.changed(seq_id)

    def changed(self, seq_id: int) -> None:
        """The table of ``seq_id`` changed in place (a block added or replaced)."""
        if self.rows is not None:
            self.rows.put(seq_id, self.tables[seq_id])

    def free(self, seq_id: int) -> None:
        """Drop a sequence's table, releasing one reference to each of its blocks.

        Blocks are released last-first, so that among a prompt's cached blocks the tail is
        evicted before the head, which other prompts are more likely to share.
        """
        for block in reversed(self.tables.pop(seq_id)):
            self.allocator.release(block)
        if self.rows is not None:
            self.rows.drop(seq_id)
