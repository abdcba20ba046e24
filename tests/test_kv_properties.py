"""Random operation sequences over both caches (hypothesis state machine).

After every step: reference counts equal the number of tables holding each block; no slot
belongs to two live sequences unless their shared block is reference-counted; the free lists
account for every unused block or slot; every sequence reads back exactly the K/V written for
its tokens. Tearing down frees everything and leaves the pool as it started.
"""

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.kv import ContiguousKVCache, KVCacheFull, PagedKVCache
from tests.kv_helpers import snapshot, token_kv

HEADS, DIM, MAX_LEN = 2, 3, 48
VOCAB = st.integers(0, 3)  # a tiny vocabulary, so prompts share prefixes


def refused(cache, method, *args) -> bool:
    """Call ``method(*args)``; if the cache refuses (KVCacheFull), check that nothing changed."""
    before = snapshot(cache)
    try:
        method(*args)
    except KVCacheFull:
        assert snapshot(cache) == before
        return True
    return False


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tokens: dict[int, list[int]] = {}  # model: each sequence's tokens
        self.final: dict[int, int] = {}
        self.swapped: set[int] = set()
        self.next_id = 0

    @initialize(
        kind=st.sampled_from(["paged", "paged-prefix", "max", "pow2", "oracle"]),
        block_size=st.sampled_from([1, 2, 4, 8]),
        size=st.integers(8, 40),
    )
    def make_cache(self, kind, block_size, size):
        kw = dict(num_kv_heads=HEADS, head_dim=DIM, dtype=torch.float32, max_seq_len=MAX_LEN)
        if kind.startswith("paged"):
            self.cache = PagedKVCache(size, block_size, enable_prefix_caching=kind == "paged-prefix",
                                      num_cpu_blocks=size, **kw)
        else:
            self.cache = ContiguousKVCache(size * 4, kind, **kw)

    # -- operations --------------------------------------------------------------------------
    def _write(self, seq_id: int, start: int) -> None:
        tokens = self.tokens[seq_id]
        positions = list(range(start, len(tokens)))
        if positions:
            kv = token_kv(tokens[start:], positions, HEADS, DIM)
            self.cache.write(0, self.cache.slot_mapping(seq_id, start), kv, -kv)

    @rule(prompt=st.lists(VOCAB, min_size=1, max_size=24), extra=st.integers(0, 20))
    def allocate(self, prompt, extra):
        seq_id, final = self.next_id, min(len(prompt) + extra, MAX_LEN)
        try:
            fits = self.cache.can_allocate(len(prompt), final, prompt)
        except ValueError:  # larger than this cache can ever hold: allocate refuses it as well
            with pytest.raises(ValueError):
                self.cache.allocate(seq_id, len(prompt), final, prompt)
            return
        if not fits:
            assert refused(self.cache, self.cache.allocate, seq_id, len(prompt), final, prompt)
            return
        cached = self.cache.allocate(seq_id, len(prompt), final, prompt)
        self.next_id += 1
        self.tokens[seq_id], self.final[seq_id] = list(prompt), final
        self._write(seq_id, cached)

    def live(self) -> list[int]:
        return [s for s in self.tokens if s not in self.swapped]

    @precondition(lambda self: self.live())
    @rule(new=st.lists(st.lists(VOCAB, min_size=1, max_size=5), min_size=1, max_size=8))
    def decode_step(self, new):
        """Every live sequence appends a few tokens, as in one engine step (forks diverge here)."""
        for i, seq_id in enumerate(self.live()):
            tokens = new[i % len(new)][: self.final[seq_id] - len(self.tokens[seq_id])]
            if not tokens:
                continue
            if not self.cache.can_append(seq_id, len(tokens)):
                assert refused(self.cache, self.cache.append_slots, seq_id, len(tokens), tokens)
                continue
            start = len(self.tokens[seq_id])
            self.cache.append_slots(seq_id, len(tokens), tokens)
            self.tokens[seq_id] += tokens
            self._write(seq_id, start)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live()))
        if refused(self.cache, self.cache.fork, parent, self.next_id):  # contiguous: no slab free
            return
        self.tokens[self.next_id], self.final[self.next_id] = list(self.tokens[parent]), self.final[parent]
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.cache.free(seq_id)
        del self.tokens[seq_id], self.final[seq_id]
        self.swapped.discard(seq_id)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def swap_out(self, data):
        group = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, max_size=3, unique=True))
        if not refused(self.cache, self.cache.swap_out, group):
            self.swapped.update(group)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        group = data.draw(st.lists(st.sampled_from(sorted(self.swapped)), min_size=1, max_size=3, unique=True))
        if not refused(self.cache, self.cache.swap_in, group):
            self.swapped.difference_update(group)

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def reads_back_what_was_written(self):
        assert sorted(self.cache.seq_ids) == sorted(self.live())
        for seq_id in self.live():
            tokens = self.tokens[seq_id]
            assert self.cache.num_tokens(seq_id) == len(tokens)
            k, v = self.cache.read(seq_id, 0)
            want = token_kv(tokens, list(range(len(tokens))), HEADS, DIM)
            assert torch.equal(k, want) and torch.equal(v, -want)

    @invariant()
    def ownership_and_counts(self):
        cache = self.cache
        if isinstance(cache, PagedKVCache):
            for pool in (cache.pool, cache.cpu_pool):
                held = Counter(b for table in pool.tables.values() for b in table)
                a = pool.allocator
                assert all(a.ref_counts[b] == held.get(b, 0) for b in range(a.num_blocks))
                assert a.num_shared == sum(count > 1 for count in a.ref_counts)
                unused = sorted(list(a.free_list) + list(a.prefix_cache.evictable))
                assert unused == sorted(b for b in range(a.num_blocks) if b not in held)
            rows = cache.pool.rows  # the kernels' copy of the tables follows every change
            assert sorted(rows.row) == sorted(cache.block_tables)
            for seq_id, table in cache.block_tables.items():
                assert rows.array[rows.row[seq_id], : len(table)].tolist() == table
            for seq_id in self.live():
                n = len(self.tokens[seq_id])
                assert len(cache.block_table(seq_id)) == -(-n // cache.block_size)
                slots = cache.slot_mapping(seq_id).tolist()
                assert len(set(slots)) == n
        else:
            pieces = sorted(list(cache.slabs.values()) + cache.buddy.free_blocks())
            end = 0
            for start, size in pieces:  # slabs and free blocks tile the arena: no slot owned twice
                assert start == end
                end = start + size
            assert end == cache.num_slots
        assert cache.memory_breakdown().total == cache.capacity

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        for seq_id in list(self.tokens):
            self.cache.free(seq_id)
        b = self.cache.memory_breakdown()
        assert b.free == self.cache.capacity
        if isinstance(self.cache, PagedKVCache):
            assert self.cache.num_free_blocks == self.cache.num_blocks
            assert self.cache.cpu_pool.allocator.num_free == self.cache.cpu_pool.allocator.num_blocks
            assert not any(self.cache.allocator.ref_counts)
        else:
            fresh = ContiguousKVCache(self.cache.num_slots, max_seq_len=MAX_LEN)
            assert self.cache.buddy.free_blocks() == fresh.buddy.free_blocks()
            assert self.cache.buddy.live == {}


CacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_cache_machine = CacheMachine.TestCase
