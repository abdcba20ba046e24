"""PagedKVCache: the block-manager behaviours vLLM's own tests check (REFERENCE.md), with exact counts."""

import pytest
import torch

from minipaged.kv import BlockAllocator, KVCacheFull, MemoryBreakdown, PagedKVCache, PrefixCache
from minipaged.kv.block_allocator import blocks_needed
from tests.kv_helpers import snapshot


def make(num_blocks=64, block_size=16, **kw) -> PagedKVCache:
    kw.setdefault("num_kv_heads", 2)
    kw.setdefault("head_dim", 4)
    kw.setdefault("dtype", torch.float32)
    return PagedKVCache(num_blocks, block_size, **kw)


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(seed))


# -- allocate / append / free: exact free-block counts ---------------------------------------
@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("seq_len", [1, 16, 129])
def test_free_block_counts_are_exact(block_size, seq_len):
    num_blocks = 1024
    cache = make(num_blocks, block_size)
    cache.allocate(0, seq_len)
    used = -(-seq_len // block_size)
    assert cache.num_free_blocks == num_blocks - used
    assert len(cache.block_table(0)) == used
    # Append up to and past a block boundary, one token at a time.
    for _ in range(2 * block_size + 1):
        cache.append_slots(0)
        used_now = -(-cache.num_tokens(0) // block_size)
        assert cache.num_free_blocks == num_blocks - used_now
    cache.free(0)
    assert cache.num_free_blocks == num_blocks


def test_append_allocates_a_block_only_when_the_last_one_is_full():
    cache = make(8, 4)
    cache.allocate(0, 3)
    assert cache.block_table(0) == [0]
    cache.append_slots(0)  # fills slot 3 of block 0
    assert cache.block_table(0) == [0] and cache.num_free_blocks == 7
    cache.append_slots(0)  # needs block 1
    assert cache.block_table(0) == [0, 1] and cache.num_free_blocks == 6
    cache.append_slots(0, 4)  # 5 -> 9 tokens: one more block
    assert cache.block_table(0) == [0, 1, 2] and cache.num_tokens(0) == 9


def test_contents_land_in_the_right_slots():
    cache = make(8, 4)
    cache.allocate(7, 6)  # blocks 0, 1
    cache.allocate(8, 2)  # block 2
    cache.append_slots(7, 3)  # 9 tokens: needs block 3
    assert cache.block_table(7) == [0, 1, 3]
    assert cache.slot_mapping(7).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert cache.slot_mapping(7, 6, 9).tolist() == [6, 7, 12]
    k, v = rows(9, 0), rows(9, 1)
    cache.write(0, cache.slot_mapping(7), k, v)
    assert torch.equal(cache.k_caches[0][3, 0], k[8]) and torch.equal(cache.v_caches[0][1, 2], v[6])
    got_k, got_v = cache.read(7, 0)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


# -- fork and copy-on-write ------------------------------------------------------------------
def test_fork_allocates_nothing_and_shares_blocks():
    cache = make(16, 4)
    cache.allocate(0, 10)
    k, v = rows(10, 2), rows(10, 3)
    cache.write(0, cache.slot_mapping(0), k, v)
    free_before = cache.num_free_blocks
    cache.fork(0, 1)
    assert cache.num_free_blocks == free_before
    assert cache.block_table(1) == cache.block_table(0)
    assert [cache.allocator.ref_counts[b] for b in cache.block_table(0)] == [2, 2, 2]
    cache.free(0)  # the child keeps its data
    assert cache.num_free_blocks == free_before
    assert torch.equal(cache.read(1, 0)[0], k)
    cache.free(1)
    assert cache.num_free_blocks == 16


@pytest.mark.parametrize("writer", ["parent", "child"])
def test_copy_on_write_of_a_partly_filled_shared_block(writer):
    cache = make(16, 4, num_layers=2)
    cache.allocate(0, 6)  # blocks [0, 1], block 1 half full
    k, v = rows(6, 4), rows(6, 5)
    cache.write(0, cache.slot_mapping(0), k, v)
    cache.write(1, cache.slot_mapping(0), 2 * k, 2 * v)
    cache.fork(0, 1)
    first, other = (0, 1) if writer == "parent" else (1, 0)
    other_table = cache.block_table(other)
    copies = cache.append_slots(first)
    assert copies == [(1, 2)]  # the writer gets a private copy of the shared last block
    assert cache.block_table(first) == [0, 2] and cache.block_table(other) == other_table == [0, 1]
    assert cache.allocator.ref_counts[:3] == [2, 1, 1]
    # The copy carried the data; writing the new token touches only the writer's block.
    new_k, new_v = rows(1, 6), rows(1, 7)
    cache.write(0, cache.slot_mapping(first, 6, 7), new_k, new_v)
    assert torch.equal(cache.read(first, 0)[0], torch.cat([k, new_k]))
    assert torch.equal(cache.read(other, 0)[0], k)
    assert torch.equal(cache.read(first, 1)[1][:6], 2 * v)  # every layer was copied
    assert torch.equal(cache.read(other, 1)[1], 2 * v)
    # The other side now owns its block alone: appending needs no copy.
    assert cache.append_slots(other) == []
    assert cache.block_table(other) == [0, 1]


def test_no_copy_when_the_shared_last_block_is_full():
    cache = make(16, 4)
    cache.allocate(0, 8)
    cache.fork(0, 1)
    assert cache.append_slots(1) == []
    assert cache.block_table(1) == [0, 1, 2] and cache.block_table(0) == [0, 1]
    assert cache.allocator.ref_counts[:3] == [2, 2, 1]


# -- prefix caching --------------------------------------------------------------------------
def test_prefix_hash_only_for_full_blocks_with_hashed_predecessors():
    cache = make(16, 4, enable_prefix_caching=True)
    cache.allocate(0, 6, token_ids=[1, 2, 3, 4, 5, 6])
    b0, b1 = cache.block_table(0)
    assert b0 in cache.prefix_cache.block_hash and b1 not in cache.prefix_cache.block_hash
    cache.append_slots(0, 2, token_ids=[7, 8])  # block 1 becomes full, its predecessor is hashed
    assert b1 in cache.prefix_cache.block_hash
    # A sequence whose tokens are unknown ends its chain: later full blocks get no hash.
    cache.allocate(1, 3, token_ids=[9, 9, 9])
    cache.append_slots(1)  # no token ids
    assert cache.block_table(1)[0] not in cache.prefix_cache.block_hash


def test_identical_prefixes_share_cached_blocks():
    cache = make(16, 4, enable_prefix_caching=True)
    prompt = list(range(10))
    assert cache.allocate(0, 10, token_ids=prompt) == 0
    free = cache.num_free_blocks
    cached = cache.allocate(1, 10, token_ids=prompt)
    assert cached == 8  # the two full blocks are reused; the partial third is new
    assert cache.block_table(1)[:2] == cache.block_table(0)[:2]
    assert cache.block_table(1)[2] != cache.block_table(0)[2]
    assert cache.num_free_blocks == free - 1
    assert [cache.allocator.ref_counts[b] for b in cache.block_table(0)] == [2, 2, 1]
    # Block 1 identical, block 0 different: block 1's hash chains block 0's, so nothing is reused.
    assert cache.allocate(2, 9, token_ids=[99, 1, 2, 3, 4, 5, 6, 7, 8]) == 0
    # Block 0 identical, block 1 different: only block 0 is reused.
    assert cache.allocate(3, 9, token_ids=[0, 1, 2, 3, 99, 5, 6, 7, 8]) == 4


def test_can_allocate_does_not_count_reused_cached_blocks_as_free():
    cache = make(4, 2, enable_prefix_caching=True)
    cache.allocate(0, 5, token_ids=[1, 2, 3, 4, 5])
    cache.free(0)  # blocks 0 and 1 stay cached (evictable), block 2 goes back to the free list
    cache.allocate(9, 2)  # takes a never-cached block
    prompt = [1, 2, 3, 4, 6, 7, 8]  # reuses blocks 0 and 1, needs 2 new ones: only 1 is free besides
    assert cache.num_free_blocks == 3 and not cache.can_allocate(7, token_ids=prompt)
    before = snapshot(cache)
    with pytest.raises(KVCacheFull, match="needs 2 new blocks besides the 2 cached ones it reuses; only 1"):
        cache.allocate(1, 7, token_ids=prompt)
    assert snapshot(cache) == before
    cache.free(9)
    assert cache.allocate(1, 7, token_ids=prompt) == 4


def test_fully_cached_prompt_still_computes_its_last_block():
    cache = make(16, 4, enable_prefix_caching=True)
    cache.allocate(0, 8, token_ids=list(range(8)))
    assert cache.allocate(1, 8, token_ids=list(range(8))) == 4
    assert cache.block_table(1)[0] == cache.block_table(0)[0]
    assert cache.block_table(1)[1] != cache.block_table(0)[1]


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    cache = make(4, 2, enable_prefix_caching=True)
    cache.allocate(0, 4, token_ids=[1, 2, 3, 4])  # blocks 0 (hash A), 1 (hash AB)
    cache.free(0)  # released last-first: evictable order [1, 0]
    assert cache.num_free_blocks == 4 and list(cache.prefix_cache.evictable) == [1, 0]
    # A hit takes the cached block back (count 0 -> 1) instead of new memory.
    assert cache.allocate(1, 3, token_ids=[1, 2, 9]) == 2
    assert cache.block_table(1) == [0, 2]
    cache.free(1)
    # Needing all four blocks: the free list first, then the least recently freed cached block.
    cache.allocate(2, 7)
    assert cache.block_table(2) == [3, 2, 1, 0]
    assert cache.prefix_cache.cached == {}


# -- the block allocator and the prefix cache on their own -------------------------------------
def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_block_allocator_free_list_and_reference_counts():
    allocator = BlockAllocator(3, PrefixCache(4, enabled=False))
    assert [allocator.allocate() for _ in range(2)] == [0, 1]  # free-list order
    allocator.share(1)
    assert allocator.ref_counts == [1, 2, 0] and allocator.num_shared == 1 and allocator.num_free == 1
    allocator.release(1)
    allocator.release(1)
    allocator.release(0)
    assert allocator.num_shared == 0 and list(allocator.free_list) == [2, 1, 0]  # freed blocks queue at the back


def test_prefix_cache_keeps_retired_blocks_evictable_lru():
    prefix_cache = PrefixCache(2)
    allocator = BlockAllocator(4, prefix_cache)
    table = [allocator.allocate() for _ in range(3)]
    prefix_cache.add(7, [1, 2, 3, 4, 5], table)  # two full blocks hashed, the third is partial
    assert sorted(prefix_cache.block_hash) == [0, 1]
    for block in reversed(table):
        allocator.release(block)
    assert list(prefix_cache.evictable) == [1, 0] and list(allocator.free_list) == [3, 2]
    assert prefix_cache.lookup([1, 2, 3, 4, 9], 5) == [0, 1] and prefix_cache.lookup([1, 2, 3, 4], 4) == [0]
    assert allocator.num_free == 4 and allocator.num_free_besides([0, 1]) == 2
    allocator.share(0)  # a hit revives block 0
    assert list(prefix_cache.evictable) == [1]
    assert [allocator.allocate() for _ in range(3)] == [3, 2, 1]  # the free list first, then eviction
    assert prefix_cache.lookup([1, 2, 3, 4, 9], 5) == [0] and 1 not in prefix_cache.block_hash


def test_disabled_prefix_cache_finds_and_remembers_nothing():
    prefix_cache = PrefixCache(2, enabled=False)
    prefix_cache.add(0, [1, 2, 3, 4], [0, 1])
    assert prefix_cache.lookup([1, 2, 3, 4], 4) == [] and prefix_cache.cached == {} and prefix_cache.seq_tokens == {}


def test_block_tables_are_the_device_pools_tables():
    cache = make(8, 4, num_cpu_blocks=8)
    cache.allocate(0, 5)
    assert cache.block_tables is cache.pool.tables and cache.pool.tables == {0: [0, 1]}
    cache.swap_out([0])  # the table moves to the CPU pool's tables
    assert cache.block_tables == {} and cache.cpu_pool.tables == {0: [0, 1]}
    cache.swap_in([0])
    assert cache.block_tables == {0: [2, 3]} and cache.cpu_pool.tables == {}


# -- swapping --------------------------------------------------------------------------------
def test_swap_out_and_in_moves_data_and_keeps_sharing():
    cache = make(8, 4, num_cpu_blocks=8, num_layers=2)
    cache.allocate(0, 6)
    k, v = rows(6, 8), rows(6, 9)
    cache.write(0, cache.slot_mapping(0), k, v)
    cache.write(1, cache.slot_mapping(0), -k, -v)
    cache.fork(0, 1)
    cache.append_slots(1)  # copy-on-write: child now [0, 2]
    cache.swap_out([0, 1])
    assert cache.num_free_blocks == 8
    assert cache.cpu_pool.allocator.num_free == 5  # block 0 moved once, still shared on the CPU
    assert cache.cpu_pool.tables[0][0] == cache.cpu_pool.tables[1][0]
    assert cache.is_swapped(0) and cache.seq_ids == []
    cache.allocate(5, 16)  # someone else uses the blocks meanwhile
    cache.free(5)
    cache.swap_in([0, 1])
    assert cache.block_table(0)[0] == cache.block_table(1)[0]  # still shared
    assert cache.allocator.ref_counts[cache.block_table(0)[0]] == 2
    assert torch.equal(cache.read(0, 0)[0], k) and torch.equal(cache.read(1, 0)[0][:6], k)
    assert torch.equal(cache.read(0, 1)[1], -v) and torch.equal(cache.read(1, 1)[1][:6], -v)
    assert cache.cpu_pool.allocator.num_free == 8
    cache.free(0)
    cache.free(1)
    assert cache.num_free_blocks == 8


def test_swap_keeps_prefix_cache_entries_and_lru_order():
    cache = make(8, 2, num_cpu_blocks=8, enable_prefix_caching=True)
    cache.allocate(0, 5, token_ids=[1, 2, 3, 4, 5])  # blocks 0, 1 hashed; block 2 partial
    cache.swap_out([0])
    assert list(cache.prefix_cache.evictable) == [1, 0]  # released last-first, as by free
    cache.allocate(1, 6)  # uses the free list first: the cached blocks survive
    cache.swap_in([0])
    table = cache.block_table(0)
    assert all(b not in (0, 1) for b in table)
    # Blocks 0 and 1 still hold those hashes, so the swapped-in copies are not registered twice...
    assert sorted(cache.prefix_cache.block_hash) == [0, 1]
    cache.free(1)
    cache.free(0)
    # ...but when the old copies were evicted meanwhile, the swapped-in blocks are registered again.
    cache.allocate(3, 5, token_ids=[1, 2, 3, 4, 5])
    cache.swap_out([3])
    cache.allocate(5, 16)  # needs every block: evicts the cached copies
    assert cache.prefix_cache.cached == {}
    cache.free(5)
    cache.swap_in([3])
    assert set(cache.prefix_cache.block_hash) == set(cache.block_table(3)[:2])
    assert cache.allocate(4, 5, token_ids=[1, 2, 3, 4, 9]) == 4


def test_swap_in_that_does_not_fit_changes_nothing():
    cache = make(4, 4, num_cpu_blocks=4)
    cache.allocate(0, 12)
    cache.swap_out([0])
    cache.allocate(1, 8)
    before = snapshot(cache)
    with pytest.raises(KVCacheFull):
        cache.swap_in([0])
    assert snapshot(cache) == before
    cache.free(0)  # a swapped-out sequence can be dropped
    assert cache.cpu_pool.allocator.num_free == 4


# -- memory breakdown: exact, with and without sharing -----------------------------------------
def test_memory_breakdown_is_exact():
    cache = make(8, 4)  # 32 slots
    cache.allocate(0, 10, final_len=13)  # 3 blocks: 10 tokens, 2 more will come, 0 never
    cache.allocate(1, 5, final_len=6)  # 2 blocks: 5 tokens, 1 more will come, 2 never
    assert cache.memory_breakdown() == MemoryBreakdown(15, 3, 2, 0, 12)
    assert cache.memory_breakdown().percentages() == {
        "token_states": 46.875, "reservation": 9.375, "internal_fragmentation": 6.25,
        "external_fragmentation": 0.0, "free": 37.5,
    }
    # A waiting prompt of 17 tokens needs 5 blocks, 3 are free: all free slots are stranded.
    assert cache.memory_breakdown(next_request=(17, None)) == MemoryBreakdown(15, 3, 2, 12, 0)
    cache.fork(0, 2)  # shared blocks are counted once
    assert cache.memory_breakdown() == MemoryBreakdown(15, 3, 2, 0, 12)
    cache.append_slots(2)  # copy-on-write: a private copy of block 2 now holds 3 tokens
    assert cache.memory_breakdown() == MemoryBreakdown(18, 4, 2, 0, 8)


# -- bad input and full cache: a clear error, the cache unchanged -----------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_blocks=-3), "num_blocks"),
        (dict(block_size=12), "power of two"),
        (dict(block_size=0), "block_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(num_cpu_blocks=-1), "num_cpu_blocks"),
        (dict(dtype=torch.int32), "floating-point"),
    ],
)
def test_bad_construction(kwargs, message):
    args = dict(num_blocks=8, block_size=4) | kwargs
    with pytest.raises(ValueError, match=message):
        PagedKVCache(**args)


def test_bad_calls_leave_the_cache_unchanged():
    cache = make(4, 4, max_seq_len=64)
    cache.allocate(0, 5, final_len=6)
    before = snapshot(cache)
    bad = [
        (lambda: cache.free(42), "not in the cache"),
        (lambda: cache.fork(0, 0), "already in use"),
        (lambda: cache.fork(9, 3), "not in the cache"),
        (lambda: cache.allocate(0, 3), "already in use"),
        (lambda: cache.allocate(1, 17), "only has 4 blocks"),
        (lambda: cache.allocate(1, 65), "max_seq_len"),
        (lambda: cache.allocate(1, 0), "num_tokens"),
        (lambda: cache.allocate(1, 4, final_len=3), "final_len"),
        (lambda: cache.append_slots(0, 2), "past its final_len"),
        (lambda: cache.swap_out([0]), "no CPU swap space"),
        (lambda: cache.swap_in([0]), "not swapped out"),
        (lambda: cache.write(0, cache.slot_mapping(0), rows(4, 0), rows(4, 0)), "shape"),
        (lambda: cache.slot_mapping(0, 3, 9), "must lie within"),
        (lambda: cache.read(0, -1), "layer"),
        (lambda: cache.allocate(1, 4, final_len=7.5), "final_len"),
        (lambda: cache.allocate(1, 2, token_ids=[1]), "token_ids"),
        (lambda: cache.append_slots(0, 1, token_ids=[1.5]), "integers"),
        (lambda: cache.attention_metadata([], []), "at least one"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
        assert snapshot(cache) == before
    with pytest.raises(KVCacheFull):
        cache.allocate(1, 16)  # valid, but only 2 blocks are free now
    assert not cache.can_allocate(16) and cache.can_allocate(8)
    assert snapshot(cache) == before


def test_append_when_out_of_blocks_raises_and_changes_nothing():
    cache = make(2, 4)
    cache.allocate(0, 4)
    cache.allocate(1, 4)
    before = snapshot(cache)
    assert not cache.can_append(0)
    with pytest.raises(KVCacheFull):
        cache.append_slots(0)
    assert snapshot(cache) == before


# -- on a GPU: the same operations with CUDA tensors and pinned swap space --------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fork_copy_on_write_and_swap_on_cuda():
    cache = make(16, 4, device="cuda", dtype=torch.bfloat16, num_cpu_blocks=16, num_layers=2)
    assert cache.cpu_pool.k_caches[0].is_pinned()
    cache.allocate(0, 6)
    k, v = rows(6, 10).cuda().bfloat16(), rows(6, 11).cuda().bfloat16()
    for layer in range(2):
        cache.write(layer, cache.slot_mapping(0), k, v)
    cache.fork(0, 1)
    assert cache.append_slots(1) == [(1, 2)]
    cache.swap_out([0, 1])
    cache.allocate(2, 64)
    cache.free(2)
    cache.swap_in([0, 1])
    for layer in range(2):
        for seq_id in (0, 1):
            got_k, got_v = cache.read(seq_id, layer)
            assert torch.equal(got_k[:6], k) and torch.equal(got_v[:6], v)


def test_the_watermark_keeps_blocks_free_for_growth_not_for_new_prompts():
    cache = PagedKVCache(10, 4, max_seq_len=64, watermark=0.2)  # 2 blocks kept free at admission
    assert cache.can_allocate(32) and cache.allocate(0, 32) == 0  # 8 blocks: exactly what admission may take
    assert not cache.can_allocate(1)  # 2 free blocks, both kept by the watermark
    cache.append_slots(0, 8)  # ...which a running sequence may grow into
    assert cache.num_free_blocks == 0
    with pytest.raises(ValueError, match="2 of them kept free by the watermark"):
        cache.can_allocate(33)  # 9 blocks: more than admission can ever give
    with pytest.raises(ValueError, match="watermark"):
        PagedKVCache(10, 4, watermark=1.0)
