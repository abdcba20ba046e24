"""The paged KV cache: PagedAttention's memory manager (paper §4.1-§4.5).

The KV space is cut into fixed-size *blocks* of ``block_size`` token slots (§4.1). A sequence
owns a *block table*: the list of physical blocks holding its logical blocks 0, 1, 2, ... in
order, so a sequence's K/V need not be contiguous and a block is allocated only when the
previous one is full (§4.2). At most ``block_size - 1`` slots per sequence are ever wasted.

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
* *prefix caching* (§4.4's shared prefix, made automatic as in vLLM): a full block gets a
  content hash that chains its tokens with its predecessor's hash, so identical prefixes have
  identical hash chains. A new prompt whose leading blocks hash to cached blocks reuses them
  (reference count + 1) instead of taking new memory. A cached block whose count drops to zero
  keeps its content and hash and stays reusable until a new allocation needs its memory; those
  blocks are evicted least-recently-freed first.

  As in vLLM, a full block is entered into the prefix cache when its slots are allocated, on
  the promise that the same step writes its K/V: a caller must write the tokens it allocated
  (from the returned number of cached tokens on) before it frees the sequence or allocates
  another one with the same prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import torch

from minipaged import ops
from minipaged.kv.accounting import Extent
from minipaged.kv.base import KVCache, KVCacheFull, check_positive


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Physical blocks: a free list, reference counts and (optionally) a content-hash cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.free_list: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # content hash -> block holding that content
        self.block_hash: dict[int, bytes] = {}  # block -> its content hash (cached blocks only)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with count 0, LRU first
        self.num_shared = 0  # blocks with a count > 1

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: never used, or cached but unreferenced."""
        return len(self.free_list) + len(self.evictable)

    def allocate(self) -> int:
        """A block for new content (count 1); evicts the least recently freed cached block if needed."""
        if self.free_list:
            block = self.free_list.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash.pop(block)]
        else:
            raise KVCacheFull("no free block")
        self.ref_counts[block] = 1
        return block

    def lookup(self, content_hash: bytes) -> int | None:
        return self.cached.get(content_hash) if self.enable_prefix_caching else None

    def share(self, block: int) -> None:
        """One more reference to ``block`` (a fork, or a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1
        self.num_shared += self.ref_counts[block] == 2

    def release(self, block: int) -> None:
        """One reference fewer; at zero the block is free (or evictable, if it is cached)."""
        self.ref_counts[block] -= 1
        self.num_shared -= self.ref_counts[block] == 1
        if self.ref_counts[block] == 0:
            if block in self.block_hash:
                self.evictable[block] = None
            else:
                self.free_list.append(block)

    def register(self, block: int, content_hash: bytes) -> None:
        """Make a full block findable by its content hash (the first block with a hash keeps it)."""
        if self.enable_prefix_caching and content_hash not in self.cached:
            self.cached[content_hash] = block
            self.block_hash[block] = content_hash


@dataclass
class BlockPool:
    """Blocks on one device: their allocator, their per-layer tensors, the tables pointing into them."""

    allocator: BlockAllocator
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    tables: dict[int, list[int]]
    name: str


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
    ) -> None:
        check_positive("num_blocks", num_blocks)
        check_positive("block_size", block_size)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if not isinstance(num_cpu_blocks, int) or num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be an integer >= 0, got {num_cpu_blocks!r}")
        super().__init__((num_blocks, block_size), num_layers, num_kv_heads, head_dim, dtype, device, max_seq_len)
        self.num_blocks, self._block_size = num_blocks, block_size
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching)
        self.block_tables: dict[int, list[int]] = {}  # live sequence -> GPU blocks
        # Prefix caching: the tokens of each sequence and the hash chain of its full blocks.
        self._token_ids: dict[int, list[int]] = {}
        self._hashes: dict[int, list[bytes]] = {}
        # Swap space: CPU blocks with their own reference counts.
        pin = self.device.type == "cuda"
        cpu_shape = (num_cpu_blocks, block_size, num_kv_heads, head_dim)
        self.cpu_k_caches = [torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        self.cpu_v_caches = [torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        self.pool = BlockPool(self.allocator, self.k_caches, self.v_caches, self.block_tables, "the KV cache")
        self.cpu_pool = BlockPool(BlockAllocator(num_cpu_blocks), self.cpu_k_caches, self.cpu_v_caches, {},
                                  "the CPU swap space")

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def block_table(self, seq_id: int) -> list[int]:
        self._check_live(seq_id)
        return list(self.block_tables[seq_id])

    # -- prefix hashing --------------------------------------------------------------------
    def _chain_hashes(self, token_ids: list[int], previous: list[bytes]) -> list[bytes]:
        """Hashes of the full blocks of ``token_ids`` after the ``len(previous)`` already hashed.

        Each hash covers the block's tokens and its predecessor's hash, so it names the whole
        prefix up to the block's end. A 128-bit BLAKE2 digest makes a collision (which would
        hand a prompt another prompt's K/V) practically impossible.
        """
        hashes = list(previous)
        bs = self.block_size
        for i in range(len(previous), len(token_ids) // bs):
            parent = hashes[-1] if hashes else b""
            tokens = array("q", token_ids[i * bs:(i + 1) * bs]).tobytes()
            hashes.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())
        return hashes[len(previous):]

    def _prefix_hits(self, token_ids: list[int] | None, num_tokens: int) -> tuple[list[bytes], list[int]]:
        """(hash chain of the prompt's full blocks, cached blocks holding its leading ones)."""
        if token_ids is None or not self.allocator.enable_prefix_caching:
            return [], []
        hashes = self._chain_hashes(token_ids, [])
        hits: list[int] = []
        for content_hash in hashes:
            block = self.allocator.lookup(content_hash)
            if block is None:
                break
            hits.append(block)
        # At least one prompt token must still be computed (it yields the next token's logits).
        if len(hits) * self.block_size == num_tokens:
            hits.pop()
        return hashes, hits

    # -- allocate / append / free ----------------------------------------------------------
    def _plan(
        self, num_tokens: int, final_len: int | None, token_ids: list[int] | None
    ) -> tuple[list[bytes], list[int], int]:
        """(hash chain, prefix-cache hits, free blocks available besides the hits)."""
        self._check_request(num_tokens, final_len, token_ids)
        total = blocks_needed(num_tokens, self.block_size)
        if total > self.num_blocks:
            raise ValueError(
                f"a prompt of {num_tokens} tokens needs {total} blocks of {self.block_size} slots, "
                f"but the cache only has {self.num_blocks} blocks"
            )
        hashes, hits = self._prefix_hits(token_ids, num_tokens)
        # Cached blocks being reused stop counting as free once they are referenced again.
        available = self.allocator.num_free - sum(self.allocator.ref_counts[b] == 0 for b in hits)
        return hashes, hits, available

    def can_allocate(self, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None) -> bool:
        _, hits, available = self._plan(num_tokens, final_len, token_ids)
        return blocks_needed(num_tokens, self.block_size) - len(hits) <= available

    def allocate(
        self, seq_id: int, num_tokens: int, final_len: int | None = None, token_ids: list[int] | None = None
    ) -> int:
        """Blocks for a prompt of ``num_tokens``; returns how many of its tokens the prefix cache
        already holds (their K/V need not be computed or written again)."""
        self._check_new(seq_id)
        hashes, hits, available = self._plan(num_tokens, final_len, token_ids)
        new_blocks = blocks_needed(num_tokens, self.block_size) - len(hits)
        if new_blocks > available:
            raise KVCacheFull(
                f"a prompt of {num_tokens} tokens needs {new_blocks} new blocks besides the {len(hits)} "
                f"cached ones it reuses; only {available} are free"
            )
        for block in hits:
            self.allocator.share(block)
        table = hits + [self.allocator.allocate() for _ in range(new_blocks)]
        for block, content_hash in zip(table, hashes):
            self.allocator.register(block, content_hash)
        self.block_tables[seq_id] = table
        self._num_tokens[seq_id], self._final_len[seq_id] = num_tokens, final_len
        if token_ids is not None and self.allocator.enable_prefix_caching:
            self._token_ids[seq_id], self._hashes[seq_id] = list(token_ids), hashes
        return len(hits) * self.block_size

    def _needs_copy_on_write(self, seq_id: int) -> bool:
        """Is the last block shared and partly filled, so that the next append must copy it?"""
        table, n = self.block_tables[seq_id], self._num_tokens[seq_id]
        return n % self.block_size != 0 and self.allocator.ref_counts[table[-1]] > 1

    def _blocks_to_append(self, seq_id: int, num_tokens: int, token_ids: list[int] | None = None) -> int:
        new_len = self._check_growth(seq_id, num_tokens, token_ids)
        grow = blocks_needed(new_len, self.block_size) - len(self.block_tables[seq_id])
        return grow + self._needs_copy_on_write(seq_id)

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        return self._blocks_to_append(seq_id, num_tokens) <= self.num_free_blocks

    def append_slots(
        self, seq_id: int, num_tokens: int = 1, token_ids: list[int] | None = None
    ) -> list[tuple[int, int]]:
        """Make room for ``num_tokens`` more tokens; returns the copy-on-write ``(src, dst)`` copies made.

        Raises KVCacheFull (nothing changed) when there are not enough free blocks: the
        scheduler then preempts a sequence.
        """
        needed = self._blocks_to_append(seq_id, num_tokens, token_ids)
        if needed > self.num_free_blocks:
            raise KVCacheFull(f"sequence {seq_id} needs {needed} new blocks, only {self.num_free_blocks} are free")
        table = self.block_tables[seq_id]
        copies = []
        if self._needs_copy_on_write(seq_id):
            shared = table[-1]
            table[-1] = self.allocator.allocate()
            self.allocator.release(shared)
            copies.append((shared, table[-1]))
            ops.copy_blocks(self.k_caches, self.v_caches, torch.tensor(copies, dtype=torch.int64, device=self.device))
        self._num_tokens[seq_id] += num_tokens
        table.extend(self.allocator.allocate() for _ in range(needed - len(copies)))
        self._extend_hash_chain(seq_id, token_ids)
        return copies

    def _extend_hash_chain(self, seq_id: int, token_ids: list[int] | None) -> None:
        """Hash the blocks that appending filled (only while the whole chain is known)."""
        if seq_id not in self._token_ids:
            return
        if token_ids is None:  # tokens unknown from here on: the chain ends
            del self._token_ids[seq_id], self._hashes[seq_id]
            return
        tokens, hashes = self._token_ids[seq_id], self._hashes[seq_id]
        tokens.extend(token_ids)
        new = self._chain_hashes(tokens, hashes)
        for block, content_hash in zip(self.block_tables[seq_id][len(hashes):], new):
            self.allocator.register(block, content_hash)
        hashes.extend(new)

    def free(self, seq_id: int) -> None:
        """Drop a sequence (live or swapped out), releasing one reference to each of its blocks.

        Blocks are released last-first, so that among a prompt's cached blocks the tail is
        evicted before the head, which other prompts are more likely to share.
        """
        if seq_id in self._swapped:
            pool = self.cpu_pool
            del self._swapped[seq_id]
        else:
            self._check_live(seq_id)
            pool = self.pool
            del self._num_tokens[seq_id]
        for block in reversed(pool.tables.pop(seq_id)):
            pool.allocator.release(block)
        del self._final_len[seq_id]
        self._token_ids.pop(seq_id, None)
        self._hashes.pop(seq_id, None)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (reference counts + 1); nothing is copied."""
        self._check_live(parent_id)
        self._check_new(child_id)
        table = self.block_tables[parent_id]
        for block in table:
            self.allocator.share(block)
        self.block_tables[child_id] = list(table)
        self._num_tokens[child_id] = self._num_tokens[parent_id]
        self._final_len[child_id] = self._final_len[parent_id]
        if parent_id in self._token_ids:
            self._token_ids[child_id] = list(self._token_ids[parent_id])
            self._hashes[child_id] = list(self._hashes[parent_id])

    # -- swapping (§4.5) -------------------------------------------------------------------
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
            for block, content_hash in zip(self.block_tables[seq_id], self._hashes.get(seq_id, [])):
                self.allocator.register(block, content_hash)

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
            table = src.tables.pop(seq_id)
            dst.tables[seq_id] = [mapping[block] for block in table]
            for block in reversed(table):
                src.allocator.release(block)

    # -- addressing and accounting ---------------------------------------------------------
    def _slots(self, seq_id: int, positions: range) -> list[int]:
        table, bs = self.block_tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def _kernel_addressing(self, seq_ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """int32 ``[len(seq_ids), max_blocks]`` block tables, padded with block 0 (never read)."""
        tables = [self.block_tables[s] for s in seq_ids]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.device), None

    def _extents(self) -> list[Extent]:
        bs = self.block_size
        if self.allocator.num_shared == 0:
            # Nothing shared (the common case): one extent per sequence, O(sequences) per call.
            extents = []
            for seq_id, table in self.block_tables.items():
                slots = len(table) * bs
                extents.append(Extent(slots, self._num_tokens[seq_id], min(self._final_len[seq_id] or slots, slots)))
            return extents
        # One extent per physical block; a shared block's fill is the same for all its holders.
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
