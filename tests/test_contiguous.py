"""BuddyAllocator and ContiguousKVCache: split, coalesce, reservation policies, exact accounting."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.kv import BuddyAllocator, ContiguousKVCache, KVCacheFull, MemoryBreakdown
from tests.kv_helpers import snapshot


# -- buddy allocator -------------------------------------------------------------------------
def test_arena_starts_as_maximal_aligned_blocks():
    assert BuddyAllocator(100).free_blocks() == [(0, 64), (64, 32), (96, 4)]
    assert BuddyAllocator(64, max_block=16).free_blocks() == [(0, 16), (16, 16), (32, 16), (48, 16)]


def test_split_and_exact_tail_return():
    buddy = BuddyAllocator(64)
    assert buddy.allocate(5) == 0  # takes an aligned block of 8, keeps 5, gives back [5, 8)
    assert buddy.free_blocks() == [(5, 1), (6, 2), (8, 8), (16, 16), (32, 32)]
    assert buddy.num_free_slots == 59
    assert buddy.allocate(2) == 6  # best fit: the free block of 2
    assert buddy.allocate(16) == 16
    assert buddy.free_blocks() == [(5, 1), (8, 8), (32, 32)]


def test_coalesce_back_to_one_block():
    buddy = BuddyAllocator(64)
    slabs = [(buddy.allocate(n), n) for n in (5, 2, 16, 9, 1)]
    for offset, size in reversed(slabs):
        buddy.free(offset, size)
    assert buddy.free_blocks() == [(0, 64)]


def test_external_fragmentation_is_real():
    buddy = BuddyAllocator(64)
    slabs = [buddy.allocate(16) for _ in range(4)]
    buddy.free(slabs[0], 16)
    buddy.free(slabs[2], 16)
    assert buddy.num_free_slots == 32
    assert not buddy.can_allocate(17)  # 32 slots free, but no aligned block of 32
    assert buddy.allocate(32) is None
    assert buddy.can_allocate(16)


def test_double_free_is_a_value_error():
    buddy = BuddyAllocator(64)
    offset = buddy.allocate(8)
    buddy.free(offset, 8)
    with pytest.raises(ValueError, match="not a live slab"):
        buddy.free(offset, 8)
    with pytest.raises(ValueError, match="not a live slab"):
        buddy.free(32, 4)
    assert buddy.free_blocks() == [(0, 64)]


def test_too_large_for_the_arena_is_a_value_error():
    with pytest.raises(ValueError, match="largest block"):
        BuddyAllocator(100).allocate(65)
    with pytest.raises(ValueError, match="num_slots"):
        BuddyAllocator(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=60), st.integers(50, 200))
def test_buddy_random_operations(ops, num_slots):
    """Live slabs never overlap, free + live = the arena, and freeing everything coalesces fully."""
    buddy = BuddyAllocator(num_slots)
    initial = buddy.free_blocks()
    live: list[tuple[int, int]] = []
    for do_free, size in ops:
        if do_free and live:
            buddy.free(*live.pop(size % len(live)))
        elif size <= buddy.max_block:
            offset = buddy.allocate(size)
            if offset is not None:
                live.append((offset, size))
        owned = sorted([(o, s, "live") for o, s in live] + [(o, s, "free") for o, s in buddy.free_blocks()])
        end = 0
        for offset, size, _ in owned:  # pieces tile [0, num_slots) without overlap
            assert offset == end
            end = offset + size
        assert end == num_slots
        for offset, size in buddy.free_blocks():  # every free block is aligned to its size
            assert offset % size == 0 and size & (size - 1) == 0
    for slab in live:
        buddy.free(*slab)
    assert buddy.free_blocks() == initial


# -- contiguous cache ------------------------------------------------------------------------
def make(num_slots=256, reservation="max", **kw) -> ContiguousKVCache:
    kw = dict(num_kv_heads=2, head_dim=4, dtype=torch.float32, max_seq_len=64) | kw
    return ContiguousKVCache(num_slots, reservation, **kw)


@pytest.mark.parametrize("reservation, expected", [("max", 64), ("pow2", 12 + 16), ("oracle", 21)])
def test_reservation_policies(reservation, expected):
    cache = make(reservation=reservation)
    cache.allocate(0, 12, final_len=21)  # output of 9 tokens: pow2 reserves 16 for it (paper §6.1)
    assert cache.slab(0)[1] == expected
    assert cache.buddy.num_free_slots == 256 - expected


def test_pow2_with_no_output_reserves_the_prompt_only():
    cache = make(reservation="pow2")
    cache.allocate(0, 5, final_len=5)
    assert cache.slab(0)[1] == 5


def test_pow2_is_capped_at_max_seq_len():
    cache = make(reservation="pow2", max_seq_len=64)
    cache.allocate(0, 40, final_len=60)  # 40 + next_pow2(20) = 72 > 64
    assert cache.slab(0)[1] == 64


def test_a_reservation_function_sets_the_slab_size():
    cache = make(reservation=lambda num_tokens, final_len: final_len + 3)
    cache.allocate(0, 12, final_len=21)
    assert cache.slab(0)[1] == 24
    assert cache.memory_breakdown() == MemoryBreakdown(12, 9, 3, 0, 256 - 24)


@pytest.mark.parametrize("policy", [lambda p, f: f - 1, lambda p, f: 65, lambda p, f: f + 0.5, lambda p, f: None],
                         ids=["short-of-final_len", "past-max_seq_len", "not-an-integer", "none"])
def test_a_reservation_function_outside_final_len_to_max_seq_len_is_refused(policy):
    cache = make(reservation=policy)
    with pytest.raises(ValueError, match="reservation policy reserved"):
        cache.allocate(0, 12, final_len=21)
    assert cache.seq_ids == [] and cache.buddy.num_free_slots == 256


def test_a_reservation_function_needs_final_len():
    with pytest.raises(ValueError, match="final_len"):
        make(reservation=lambda p, f: f).allocate(0, 12)


def test_breakdown_of_one_request_per_policy():
    # 12 tokens now, 21 at the end. Arena 256 slots; max_seq_len 64.
    expected = {
        "max": MemoryBreakdown(12, 9, 64 - 21, 0, 256 - 64),
        "pow2": MemoryBreakdown(12, 9, 28 - 21, 0, 256 - 28),
        "oracle": MemoryBreakdown(12, 9, 0, 0, 256 - 21),
    }
    for policy, want in expected.items():
        cache = make(reservation=policy)
        cache.allocate(0, 12, final_len=21)
        assert cache.memory_breakdown() == want
        assert cache.memory_breakdown().total == 256


def test_external_fragmentation_counts_free_blocks_too_small_for_the_next_request():
    cache = make(128, "oracle", max_seq_len=64)
    for seq_id in range(4):
        cache.allocate(seq_id, 32, final_len=32)
    cache.free(0)
    cache.free(2)  # free: [0, 32) and [64, 96): 64 slots, no aligned block of 64
    b = cache.memory_breakdown(next_request=(40, 40))  # needs an aligned block of 64
    assert (b.external_fragmentation, b.free) == (64, 0)
    b = cache.memory_breakdown(next_request=(10, 20))  # needs 32: both blocks serve it
    assert (b.external_fragmentation, b.free) == (0, 64)
    assert not cache.can_allocate(40, 40) and cache.can_allocate(10, 20)


def test_fork_copies_into_a_new_slab_and_swap_round_trips():
    cache = make(256, "pow2")
    cache.allocate(0, 5, final_len=9)  # 5 + next_pow2(4) = 9
    k, v = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    cache.write(0, cache.slot_mapping(0), k, v)
    cache.fork(0, 1)
    assert cache.slab(1)[1] == 9 and cache.slab(1)[0] != cache.slab(0)[0]
    assert torch.equal(cache.read(1, 0)[0], k) and torch.equal(cache.read(1, 0)[1], v)
    cache.swap_out([0])
    assert cache.buddy.num_free_slots == 256 - 9
    cache.swap_in([0])
    assert torch.equal(cache.read(0, 0)[0], k) and torch.equal(cache.read(0, 0)[1], v)
    cache.free(0)
    cache.free(1)
    assert cache.buddy.free_blocks() == [(0, 256)]


def test_admission_fails_cleanly_when_no_block_is_large_enough():
    cache = make(128, "max")
    cache.allocate(0, 10)
    cache.allocate(1, 10)
    before = snapshot(cache)
    assert not cache.can_allocate(1)
    with pytest.raises(KVCacheFull):
        cache.allocate(2, 1)
    assert snapshot(cache) == before


def test_swap_in_rolls_back_when_one_sequence_does_not_fit():
    cache = make(128, "oracle")
    cache.allocate(0, 30, final_len=60)
    cache.allocate(1, 30, final_len=60)
    cache.swap_out([0, 1])
    cache.allocate(2, 60, final_len=64)
    before = snapshot(cache)
    with pytest.raises(KVCacheFull):
        cache.swap_in([0, 1])  # one of them fits, the other does not
    assert snapshot(cache) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_slots=0), "num_slots"),
        (dict(reservation="half"), "reservation"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(num_kv_heads=-1), "num_kv_heads"),
    ],
)
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContiguousKVCache(**(dict(num_slots=64, reservation="max") | kwargs))


def test_bad_calls_leave_the_cache_unchanged():
    cache = make(100, "pow2", max_seq_len=64)
    cache.allocate(0, 5, final_len=6)
    before = snapshot(cache)
    bad = [
        (lambda: cache.free(3), "not in the cache"),
        (lambda: cache.fork(0, 0), "already in use"),
        (lambda: cache.allocate(1, 10), "needs the request's final_len"),
        (lambda: cache.allocate(1, 65, final_len=65), "max_seq_len"),
        (lambda: cache.append_slots(0, 2), "past its final_len"),
        (lambda: cache.swap_in([0]), "not swapped out"),
        (lambda: cache.swap_out([0, 0]), "distinct"),
        (lambda: cache.slot_mapping(0, 0, 6), "must lie within"),
        (lambda: cache.read(0, 1), "layer"),
        (lambda: cache.allocate(1, 4, final_len=7.5), "final_len"),
        (lambda: cache.allocate(1, 2, final_len=3, token_ids=[1]), "token_ids"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
        assert snapshot(cache) == before
    small = make(40, "oracle", max_seq_len=64)
    with pytest.raises(ValueError, match="largest block"):  # 33 slots need an aligned 64: never fits
        small.allocate(0, 33, final_len=33)
    assert small.buddy.free_blocks() == [(0, 32), (32, 8)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fork_and_swap_on_cuda():
    cache = make(256, "oracle", device="cuda", dtype=torch.float16, num_layers=2)
    cache.allocate(0, 5, final_len=9)
    k, v = torch.randn(5, 2, 4, device="cuda").half(), torch.randn(5, 2, 4, device="cuda").half()
    for layer in range(2):
        cache.write(layer, cache.slot_mapping(0), k, v)
    cache.fork(0, 1)
    cache.swap_out([0])
    assert cache._swap_space[0][1][0].is_pinned()
    cache.swap_in([0])
    for layer in range(2):
        assert torch.equal(cache.read(0, layer)[0], k) and torch.equal(cache.read(1, layer)[1], v)
