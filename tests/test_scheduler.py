"""THE scheduler, driven through the engine loop with the known-lengths stand-in: exact plans on
traces small enough to follow by hand, and random traces that must all finish, with the right
lengths and no block leaked, on both caches, under both preemption modes and any choice of victim."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.engine import LLMEngine, SamplingParams, StandInRunner
from minipaged.engine.scheduler import Scheduler
from minipaged.kv import ContiguousKVCache, PagedKVCache


def engine_for(cache, *, max_num_seqs=64, max_num_batched_tokens=10_000, preemption_mode="recompute"):
    return LLMEngine(cache, StandInRunner(), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, preemption_mode=preemption_mode)


def add(engine, prompt_len: int, output_len: int):
    group = engine.make_request([1] * prompt_len, SamplingParams(max_tokens=output_len, ignore_eos=True))
    engine.add(group)
    return group.seqs[0]


def plans(engine, steps: int) -> list[list[tuple[int, int]]]:
    """(seq_id, tokens fed) of each scheduled sequence, step by step."""
    out = []
    for _ in range(steps):
        engine.step()
        out.append([(s.seq.seq_id, s.num_new_tokens) for s in engine.last_plan.scheduled])
    return out


def run_to_end(engine, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished()


def test_first_come_first_served_and_nothing_overtakes_the_head():
    # 4 blocks of 4 slots. A (prompt 6: 2 blocks), B (prompt 12: 3 blocks) waits for A, and
    # C (prompt 1), which would fit, waits behind B.
    engine = engine_for(PagedKVCache(4, 4, max_seq_len=32))
    a, b, c = add(engine, 6, 2), add(engine, 12, 1), add(engine, 1, 1)
    assert plans(engine, 4) == [
        [(a.seq_id, 6)],  # A prefills; B needs 3 blocks, 2 are free; C waits behind B
        [(a.seq_id, 1)],  # A feeds its first token, samples its last and leaves
        [(b.seq_id, 12), (c.seq_id, 1)],  # B, then C, are admitted in order
        [],
    ]
    assert not engine.has_unfinished()
    assert engine.cache.num_free_blocks == 4


def test_chunked_prefill_feeds_a_long_prompt_in_chunks_of_the_token_budget():
    engine = engine_for(PagedKVCache(16, 4, max_seq_len=64), max_num_batched_tokens=4)
    long, short = add(engine, 10, 2), add(engine, 3, 2)
    assert plans(engine, 5) == [
        [(long.seq_id, 4)],
        [(long.seq_id, 4)],
        [(long.seq_id, 2), (short.seq_id, 2)],  # the last chunk samples; the next prompt gets what is left
        [(long.seq_id, 1), (short.seq_id, 1)],  # long decodes (and is done); short's last prompt token samples
        [(short.seq_id, 1)],
    ]
    assert not engine.has_unfinished() and engine.cache.num_free_blocks == 16


def test_recompute_preempts_the_newest_and_it_comes_back_with_its_generated_tokens():
    # 3 blocks of 2 slots: A and B hold a block each after prefill (prompt 2). Growing A to 3
    # tokens takes the third block; B then finds none and preempts itself (the newest).
    engine = engine_for(PagedKVCache(3, 2, max_seq_len=16))
    a, b = add(engine, 2, 3), add(engine, 2, 2)
    assert plans(engine, 5) == [
        [(a.seq_id, 2), (b.seq_id, 2)],
        [(a.seq_id, 1)],  # B preempted; back in the queue as a prompt of 3 tokens (2 + 1 generated)
        [(a.seq_id, 1)],  # A samples its third token and leaves
        [(b.seq_id, 3)],  # B recomputes all it had, and samples its second token
        [],
    ]
    assert engine.scheduler.num_preemptions == 1
    assert a.output_token_ids == [0] * 3 and b.output_token_ids == [0] * 2
    assert engine.cache.num_free_blocks == 3


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("kind", ["paged", "contiguous-oracle"])
@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=12),
       budget=st.integers(1, 30), max_num_seqs=st.integers(1, 8))
def test_every_request_finishes_with_its_length_and_no_memory_leaks(kind, mode, lengths, budget, max_num_seqs):
    if kind == "paged":
        cache = PagedKVCache(7, 4, max_seq_len=24, num_cpu_blocks=16)
    else:
        cache = ContiguousKVCache(32, "oracle", max_seq_len=24)
    engine = engine_for(cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, preemption_mode=mode)
    seqs = [add(engine, p, o) for p, o in lengths]
    run_to_end(engine)
    assert [len(s.output_token_ids) for s in seqs] == [o for _, o in lengths]
    assert cache.seq_ids == []
    assert cache.memory_breakdown().free == cache.capacity


def test_a_request_the_cache_can_never_hold_is_refused_before_anything_is_queued():
    engine = engine_for(PagedKVCache(2, 4, max_seq_len=64))
    with pytest.raises(ValueError, match="blocks"):
        add(engine, 5, 10)  # 14 tokens need 4 blocks; the pool has 2
    with pytest.raises(ValueError, match="at least one token"):
        add(engine, 0, 1)
    with pytest.raises(ValueError, match="max_model_len"):
        add(engine, 64, 1)
    assert not engine.has_unfinished()


class OldestVictim(Scheduler):
    def choose_victim(self, candidates):
        return candidates[0]


class MostTokensVictim(Scheduler):
    def choose_victim(self, candidates):
        return max(reversed(candidates), key=lambda group: sum(seq.num_cached for seq in group.seqs))


def with_scheduler(engine, scheduler_class):
    """The engine with its scheduler replaced by a subclass choosing its own victims."""
    old = engine.scheduler
    engine.scheduler = scheduler_class(old.cache, max_num_seqs=old.max_num_seqs,
                                       max_num_batched_tokens=old.max_num_batched_tokens,
                                       preemption_mode=old.preemption_mode)
    return engine


def test_choose_victim_picks_among_the_group_without_room_and_the_groups_after_it():
    # 2 blocks of 2 slots, both taken by the prompts of A and B. A's third token needs a block:
    # by default B (the newest) is preempted; choosing the oldest candidate preempts A itself,
    # and B grows into A's block in the same step.
    default = engine_for(PagedKVCache(2, 2, max_seq_len=16))
    a, b = add(default, 2, 2), add(default, 2, 2)
    assert plans(default, 4) == [[(a.seq_id, 2), (b.seq_id, 2)], [(a.seq_id, 1)], [(b.seq_id, 3)], []]
    oldest = with_scheduler(engine_for(PagedKVCache(2, 2, max_seq_len=16)), OldestVictim)
    a, b = add(oldest, 2, 2), add(oldest, 2, 2)
    assert plans(oldest, 4) == [[(a.seq_id, 2), (b.seq_id, 2)], [(b.seq_id, 1)], [(a.seq_id, 3)], []]
    assert default.scheduler.num_preemptions == oldest.scheduler.num_preemptions == 1


def test_choose_victim_must_return_a_candidate():
    class Outsider(Scheduler):
        def choose_victim(self, candidates):
            return copy.copy(candidates[-1])  # a look-alike, not a running group

    engine = with_scheduler(engine_for(PagedKVCache(2, 2, max_seq_len=16)), Outsider)
    add(engine, 2, 2), add(engine, 2, 2)
    engine.step()
    with pytest.raises(AssertionError, match="one of the candidates"):
        engine.step()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", [OldestVictim, MostTokensVictim])
@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=12),
       budget=st.integers(1, 30))
def test_any_victim_policy_finishes_every_request_with_its_length_and_leaks_nothing(policy, mode, lengths, budget):
    cache = PagedKVCache(7, 4, max_seq_len=24, num_cpu_blocks=16)
    engine = with_scheduler(engine_for(cache, max_num_batched_tokens=budget, preemption_mode=mode), policy)
    seqs = [add(engine, p, o) for p, o in lengths]
    run_to_end(engine)
    assert [len(s.output_token_ids) for s in seqs] == [o for _, o in lengths]
    assert cache.seq_ids == [] and cache.num_free_blocks == 7
