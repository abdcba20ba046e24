"""The paged KV cache: PagedAttention's memory manager (paper §4.1-§4.5).

The KV space is cut into fixed-size *blocks* of ``block_size`` token slots (§4.1). A sequence
owns a *block table*: the list of physical blocks holding its logical blocks 0, 1, 2, ... in
order, so a sequence's K/V need not be contiguous and a block is allocated only when the
previous one is full (§4.2). At most ``block_size - 1`` slots per sequence are ever wasted.
Blocks come from a free list (``minipaged.kv.block_allocator``) where the contiguous cache's
slabs come from a buddy allocator.

Blocks carry *reference counts*, which make sharing cheap (§4.4):

* ``fork`` gives a child sequence the parent's table; every block's count goes up by one and
  nothing is copied (parallel sampling, beam search).
* *copy-on-write*: before a sequence appends into a last block that is shared and only partly
  filled, it gets a private copy of that block. The copy is recorded as a ``(src, dst)`` pair
  and carried out on every layer's tensors. A full shared block is never copied: appends go
  to a new block.

Two more mechanisms:

* *swapping* (§4.5): when GPU blocks run out, whole sequences can move to a pool of CPU blocks
  (pinned memory when the cache is on CUDA) and come back later, into any free GPU blocks.
* *prefix caching* (§4.4's shared prefix, made automatic as in vLLM; ``minipaged.kv.prefix_cache``):
  a new prompt whose leading full blocks hold the same tokens as cached blocks reuses them
  (reference count + 1) instead of taking new memory. Its caller must write the K/V of the
  tokens it allocated beyond those in the same step (that module says why).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from minipaged import ops
from minipaged.kv.accounting import Extent
from minipaged.kv.base import KVCache, KVCacheFull, check_positive
from minipaged.kv.block_allocator import BlockAllocator, BlockPool, TableRows, blocks_needed
from minipaged.kv.prefix_cache import PrefixCache
from minipaged.ops.metadata import to_device


class PagedKVCache(KVCache):
    """KV cache of ``num_blocks`` blocks of ``block_size`` slots, ``[num_blocks, block_size, H_kv, D]`` per layer."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        num_layers: int = 1,
        num_kv_heads: int = 1,
        head_dim: int = 1,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        max_seq_len: int = 2048,
        enable_prefix_caching: bool = False,
        num_cpu_blocks: int = 0,
        watermark: float = 0.0,
    ) -> None:
        check_positive("num_blocks", num_blocks)
        check_positive("block_size", block_size)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if not isinstance(num_cpu_blocks, int) or num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be an integer >= 0, got {num_cpu_blocks!r}")
        if not (isinstance(watermark, (int, float)) and 0 <= watermark < 1):
            raise ValueError(f"watermark must be a fraction in [0, 1), got {watermark!r}")
        super().__init__((num_blocks, block_size), num_layers, num_kv_heads, head_dim, dtype, device, max_seq_len)
        self.num_blocks, self._block_size = num_blocks, block_size
        # Admission leaves this many blocks free, so that running sequences can grow into them
        # without being preempted right away (vLLM's block manager); appends may use them.
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_cache = PrefixCache(block_size, enable_prefix_caching)
        self.allocator = BlockAllocator(num_blocks, self.prefix_cache)
        self.pool = BlockPool(self.allocator, self.k_caches, self.v_caches, "the KV cache",
                              rows=TableRows(blocks_needed(max_seq_len, block_size)))
        # Swap space: CPU blocks with their own reference counts (and no prefix cache).
        pin = self.device.type == "cuda"
        cpu_shape = (num_cpu_blocks, block_size, num_kv_heads, head_dim)
        cpu_k_caches = [torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        cpu_v_caches = [torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        cpu_allocator = BlockAllocator(num_cpu_blocks, PrefixCache(block_size, enabled=False))
        self.cpu_pool = BlockPool(cpu_allocator, cpu_k_caches, cpu_v_caches, "the CPU swap space")

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def uses_token_ids(self) -> bool:
        return self.prefix_cache.enabled

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def block_tables(self) -> dict[int, list[int]]:
        """Live sequence -> its blocks: the device pool's tables (a swapped-out table is in the CPU pool's)."""
        return self.pool.tables

    def block_table(self, seq_id: int) -> list[int]:
        """Physical blocks of a live sequence, logical block 0 first."""
        self._check_live(seq_id)
        return list(self.block_tables[seq_id])

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def prompt_blocks(self, num_tokens: int, final_len: int | None, token_ids: list[int] | None = None) -> int:
        """How many blocks a prompt needs (and checks it can ever fit); its output gets blocks as it grows."""
        self._check_request(num_tokens, final_len, token_ids)
        needed = blocks_needed(num_tokens, self.block_size)
        if needed > self.num_blocks - self.watermark_blocks:
            kept = f", {self.watermark_blocks} of them kept free by the watermark" if self.watermark_blocks else ""
            raise ValueError(
                f"a prompt of {num_tokens} tokens needs {needed} blocks of {self.block_size} slots, "
                f"but the cache only has {self.num_blocks} blocks{kept}"
            )
        return needed

    # -- allocate / append / free ----------------------------------------------------------
    def can_allocate(self, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None,
                     width: int = 1) -> bool:
        # Forks share the prompt's blocks; all but one copy its last block if it is partly filled.
        copies = (width - 1) * (num_tokens % self.block_size != 0)
        needed = self.prompt_blocks(num_tokens, final_len, token_ids) + copies
        hits = self.prefix_cache.lookup(token_ids, num_tokens)
        return needed - len(hits) <= self.allocator.num_free_besides(hits) - self.watermark_blocks

    def allocate(
        self, seq_id: int, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None
    ) -> int:
        """Blocks for the prompt only; returns how many of its tokens the prefix cache already
        holds (their K/V need not be computed or written again)."""
        self._check_new(seq_id)
        needed = self.prompt_blocks(num_tokens, final_len, token_ids)
        hits = self.prefix_cache.lookup(token_ids, num_tokens)
        new_blocks, available = needed - len(hits), self.allocator.num_free_besides(hits) - self.watermark_blocks
        if new_blocks > available:
            raise KVCacheFull(
                f"a prompt of {num_tokens} tokens needs {new_blocks} new blocks besides the {len(hits)} "
                f"cached ones it reuses; only {available} are free for new prompts"
            )
        for block in hits:
            self.allocator.share(block)
        self.pool.set_table(seq_id, hits + [self.allocator.allocate() for _ in range(new_blocks)])
        self.prefix_cache.add(seq_id, token_ids, self.block_tables[seq_id])
        self._num_tokens[seq_id], self._final_len[seq_id] = num_tokens, final_len
        return len(hits) * self.block_size

    def can_allocate_many(self, requests: list[tuple[int, int | None, list[int] | None]]) -> bool:
        # Counting every prompt block as new is exact without prefix caching and an upper bound
        # with it (a hit takes at most the one free block it revives).
        needed = sum(self.prompt_blocks(*request) for request in requests)
        return needed <= self.num_free_blocks - self.watermark_blocks

    def can_ever_hold(self, count: int, num_tokens: int, final_len: int | None = None) -> bool:
        return count * self.prompt_blocks(num_tokens, final_len) <= self.num_blocks - self.watermark_blocks

    def can_append_many(self, appends: dict[int, int]) -> bool:
        needed, writers = 0, Counter()
        for seq_id, num_tokens in appends.items():
            new_len = self._check_growth(seq_id, num_tokens)
            table = self.block_tables[seq_id]
            grow, copy = self._growth(table, new_len, num_tokens)
            needed += grow
            if copy:
                writers[table[-1]] += 1
        # Of w sequences writing into one shared, partly filled block, each copies it, except the
        # last when no one else holds it any more: by then its count is down to one.
        ref_counts = self.allocator.ref_counts
        needed += sum(w - (w == ref_counts[block]) for block, w in writers.items())
        return needed <= self.num_free_blocks

    def append_slots(
        self, seq_id: int, num_tokens: int = 1, token_ids: list[int] | None = None
    ) -> list[tuple[int, int]]:
        """A new block only when the last one is full; copy-on-write first if the last one is shared.

        Returns the copy-on-write ``(src, dst)`` block copies made. Raises KVCacheFull (nothing
        changed) when there are not enough free blocks: the scheduler then preempts a sequence.
        """
        new_len = self._check_growth(seq_id, num_tokens, token_ids)
        table = self.pool.tables[seq_id]
        copies = []
        # Every running sequence appends every step, so the common case comes first: the new
        # tokens fit the table's last block, and no one else holds it (one look, no call).
        if new_len > len(table) * self._block_size or self.allocator.ref_counts[table[-1]] > 1:
            grow, copy = self._growth(table, new_len, num_tokens)
            if grow + copy > self.num_free_blocks:
                raise KVCacheFull(f"sequence {seq_id} needs {grow + copy} new blocks, "
                                  f"only {self.num_free_blocks} are free")
            if copy:
                shared = table[-1]
                table[-1] = self.allocator.allocate()
                self.allocator.release(shared)
                copies.append((shared, table[-1]))
                pair = to_device([shared, table[-1]], torch.int64, self.device).view(1, 2)
                ops.copy_blocks(self.k_caches, self.v_caches, pair)
            table.extend(self.allocator.allocate() for _ in range(grow))
            self.pool.changed(seq_id)
        self._num_tokens[seq_id] = new_len
        if self.prefix_cache.enabled:
            self.prefix_cache.extend(seq_id, token_ids, table)
        return copies

    def _growth(self, table: list[int], new_len: int, num_tokens: int) -> tuple[int, bool]:
        """What growing a sequence with block table ``table`` by ``num_tokens`` to ``new_len``
        tokens takes: new blocks past the end of the table, and whether the last block is shared
        and partly filled, so that it must be copied first (a copy-on-write replaces the last
        block, it does not add one)."""
        bs = self._block_size
        copy = (new_len - num_tokens) % bs != 0 and self.allocator.ref_counts[table[-1]] > 1
        return -(-new_len // bs) - len(table), copy

    def free(self, seq_id: int) -> None:
        if seq_id in self._swapped:
            del self._swapped[seq_id]
            self.cpu_pool.free(seq_id)
        else:
            self._check_live(seq_id)
            self.pool.free(seq_id)
            del self._num_tokens[seq_id]
        del self._final_len[seq_id]
        self.prefix_cache.forget(seq_id)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (reference counts + 1); nothing is copied."""
        self._check_live(parent_id)
        self._check_new(child_id)
        table = self.block_tables[parent_id]
        for block in table:
            self.allocator.share(block)
        self.pool.set_table(child_id, list(table))
        self._num_tokens[child_id], self._final_len[child_id] = self._num_tokens[parent_id], self._final_len[parent_id]
        self.prefix_cache.fork(parent_id, child_id)

    # -- swapping --------------------------------------------------------------------------
    def swap_out(self, seq_ids: list[int]) -> None:
        """Move sequences (e.g. a whole sequence group) to CPU blocks.

        Blocks shared inside the group move once and stay shared on the CPU. Raises
        KVCacheFull (nothing changed) when the CPU pool is too small.
        """
        self._check_group(seq_ids, swapped=False)
        if self.cpu_pool.allocator.num_blocks == 0:
            raise ValueError("this cache has no CPU swap space (num_cpu_blocks=0)")
        self._move(seq_ids, self.pool, self.cpu_pool)
        for seq_id in seq_ids:
            self._swapped[seq_id] = self._num_tokens.pop(seq_id)

    def swap_in(self, seq_ids: list[int]) -> None:
        """Bring swapped-out sequences back into free device blocks (any of them)."""
        self._check_group(seq_ids, swapped=True)
        self._move(seq_ids, self.cpu_pool, self.pool)
        for seq_id in seq_ids:
            self._num_tokens[seq_id] = self._swapped.pop(seq_id)
            self.prefix_cache.register(seq_id, self.block_tables[seq_id])

    def _move(self, seq_ids: list[int], src: BlockPool, dst: BlockPool) -> None:
        # Each distinct block moves once and keeps one reference per sequence of the group holding it.
        references = Counter(block for seq_id in seq_ids for block in src.tables[seq_id])
        if len(references) > dst.allocator.num_free:
            raise KVCacheFull(f"{dst.name} has {dst.allocator.num_free} free blocks, {len(references)} needed")
        mapping = {}
        for block, count in references.items():
            mapping[block] = dst.allocator.allocate()
            for _ in range(count - 1):
                dst.allocator.share(mapping[block])
        pairs = torch.tensor(list(mapping.items()), dtype=torch.int64).view(-1, 2)
        for layer in range(self.num_layers):
            ops.swap_blocks(src.k_caches[layer], dst.k_caches[layer], pairs)
            ops.swap_blocks(src.v_caches[layer], dst.v_caches[layer], pairs)
        for seq_id in seq_ids:
            dst.set_table(seq_id, [mapping[block] for block in src.tables[seq_id]])
            src.free(seq_id)

    def blocks_in_use(self) -> tuple[int, int]:
        return sum(map(len, self.block_tables.values())), self.num_blocks - self.num_free_blocks

    # -- addressing and accounting ---------------------------------------------------------
    def _kernel_addressing(self, seq_ids: list[int], max_len: int) -> np.ndarray:
        """The block tables ``[len(seq_ids), blocks of max_len]``, padded with block 0 (never read):
        rows of the pool's copy (``TableRows``), not built from the lists."""
        return self.pool.rows.take(seq_ids, blocks_needed(max_len, self._block_size))

    def _slots(self, addressing: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        bs = self._block_size
        return addressing[rows, positions // bs].astype(np.int64) * bs + positions % bs

    def _extents(self) -> list[Extent]:
        if self.allocator.num_shared:
            return self._block_extents()
        extents = []  # nothing shared (the common case): one extent per sequence, O(sequences) per call
        for seq_id, table in self.block_tables.items():
            slots = len(table) * self.block_size
            extents.append(Extent(slots, self._num_tokens[seq_id], min(self._final_len[seq_id] or slots, slots)))
        return extents

    def _block_extents(self) -> list[Extent]:
        """One extent per physical block, so that a shared block counts once (its fill is the same for all holders)."""
        bs = self.block_size
        per_block: dict[int, Extent] = {}
        for seq_id, table in self.block_tables.items():
            n = self._num_tokens[seq_id]
            final = self._final_len[seq_id] or len(table) * bs
            for i, block in enumerate(table):
                filled = min(max(n - i * bs, 0), bs)
                will_fill = max(filled, min(max(final - i * bs, 0), bs))
                old = per_block.get(block)
                if old is None or will_fill > old.will_fill:
                    per_block[block] = Extent(bs, filled, will_fill)
        return list(per_block.values())

    def _free_slots(self, next_request: tuple[int, int | None] | None) -> tuple[int, int]:
        free = self.num_free_blocks * self.block_size
        if next_request is None:
            return free, free
        return free, free if self.can_allocate(next_request[0]) else 0
