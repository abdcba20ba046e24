"""Automatic prefix caching: full blocks found again by the content hash of their prefix
(paper §4.4's shared prefix, made automatic as in vLLM).

A full block gets a content hash that chains its tokens with its predecessor's hash, so the
hash names the whole prefix up to the block's end and identical prefixes have identical hash
chains. A block gets a hash only when it is full and its predecessor has one. A new prompt whose
leading blocks hash to cached blocks reuses them (reference count + 1) instead of taking new
memory.

A cached block whose reference count drops to zero keeps its content and its hash: it is
*evictable*, reusable by a later prompt until a new allocation needs its memory. Evictable blocks
are evicted least-recently-freed first. The block allocator (``minipaged.kv.block_allocator``)
counts them as free and asks this class to evict one when its free list is empty.

As in vLLM, a full block is entered into the cache when its slots are allocated, on the promise
that the same step writes its K/V: a caller must write the tokens it allocated (from the
returned number of cached tokens on) before it frees the sequence or allocates another one with
the same prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator


class PrefixCache:
    """Content hash -> block for full blocks, the hash chain of each sequence, and the LRU of evictable blocks.

    Disabled (``enabled=False``), it finds nothing and remembers nothing, so every call is a no-op.
    """

    def __init__(self, block_size: int, enabled: bool = True) -> None:
        self.block_size, self.enabled = block_size, enabled
        self.cached: dict[bytes, int] = {}  # content hash -> block holding that content
        self.block_hash: dict[int, bytes] = {}  # block -> its content hash (cached blocks only)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with count 0, LRU first
        # Sequences whose every token is known: their tokens and the hash chain of their full blocks.
        self.seq_tokens: dict[int, list[int]] = {}
        self.seq_hashes: dict[int, list[bytes]] = {}

    def _chain(self, token_ids: list[int], previous: list[bytes]) -> Iterator[bytes]:
        """Hashes of the full blocks of ``token_ids`` after the ``len(previous)`` already hashed.

        Each hash covers the block's tokens and its predecessor's hash. A 128-bit BLAKE2 digest
        makes a collision (which would hand a prompt another prompt's K/V) practically impossible.
        """
        bs, parent = self.block_size, previous[-1] if previous else b""
        for i in range(len(previous), len(token_ids) // bs):
            tokens = array("q", token_ids[i * bs:(i + 1) * bs]).tobytes()
            parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
            yield parent

    # -- the sequences' hash chains --------------------------------------------------------
    def lookup(self, token_ids: list[int] | None, num_tokens: int) -> list[int]:
        """Cached blocks holding the prompt's leading full blocks (none without its token ids)."""
        if token_ids is None or not self.enabled:
            return []
        hits: list[int] = []
        for content_hash in self._chain(token_ids, []):
            block = self.cached.get(content_hash)
            if block is None:
                break
            hits.append(block)
        # At least one prompt token must still be computed (it yields the next token's logits).
        if len(hits) * self.block_size == num_tokens:
            hits.pop()
        return hits

    def add(self, seq_id: int, token_ids: list[int] | None, table: list[int]) -> None:
        """Enter the full blocks of a newly allocated prompt; follow its chain from here on."""
        if token_ids is None or not self.enabled:
            return
        self.seq_tokens[seq_id], self.seq_hashes[seq_id] = list(token_ids), list(self._chain(token_ids, []))
        self.register(seq_id, table)

    def extend(self, seq_id: int, token_ids: list[int] | None, table: list[int]) -> None:
        """Hash the blocks that appending filled (only while the whole chain is known)."""
        if seq_id not in self.seq_tokens:
            return
        if token_ids is None:  # tokens unknown from here on: the chain ends
            self.forget(seq_id)
            return
        tokens, hashes = self.seq_tokens[seq_id], self.seq_hashes[seq_id]
        tokens.extend(token_ids)
        new = list(self._chain(tokens, hashes))
        for block, content_hash in zip(table[len(hashes):], new):
            self._enter(block, content_hash)
        hashes.extend(new)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child's chain is the parent's, until one of them appends."""
        if parent_id in self.seq_tokens:
            self.seq_tokens[child_id] = list(self.seq_tokens[parent_id])
            self.seq_hashes[child_id] = list(self.seq_hashes[parent_id])

    def forget(self, seq_id: int) -> None:
        """Stop following a sequence's chain (its blocks stay cached)."""
        self.seq_tokens.pop(seq_id, None)
        self.seq_hashes.pop(seq_id, None)

    def register(self, seq_id: int, table: list[int]) -> None:
        """Make a sequence's hashed blocks findable (again, after a swap-in moved them)."""
        for block, content_hash in zip(table, self.seq_hashes.get(seq_id, [])):
            self._enter(block, content_hash)

    def _enter(self, block: int, content_hash: bytes) -> None:
        """Make a full block findable by its content hash (the first block with a hash keeps it)."""
        if content_hash not in self.cached:
            self.cached[content_hash] = block
            self.block_hash[block] = content_hash

    # -- the blocks' life: what the block allocator asks ------------------------------------
    def retire(self, block: int) -> bool:
        """``block`` lost its last reference: keep it, evictable, if it is cached (True), else False."""
        if block not in self.block_hash:
            return False
        self.evictable[block] = None
        return True

    def revive(self, block: int) -> None:
        """An evictable block is referenced again (a prefix hit): it may no longer be evicted."""
        del self.evictable[block]

    def evict(self) -> int:
        """Forget the least recently freed evictable block, whose memory then takes new content."""
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.block_hash.pop(block)]
        return block
