"""A Llama-family transformer whose attention reads and writes through a KV cache (paper §2, §4.1).

The paper's subject is the memory that holds the keys and values a transformer produces (§2):
every layer turns each new token into a query, a key and a value, keeps the key and value, and
lets the query attend over every kept key and value of its sequence. This file is that
transformer, small enough to read in one sitting (nanoGPT's shape, with Llama's parts: RMSNorm,
rotary position embeddings, grouped-query attention, a SwiGLU MLP).

The one idea: a layer never knows how the cache is laid out. The step's ``AttentionMetadata``
says where each new token's K/V goes (``slot_mapping``) and where every sequence's context lies
(block tables for the paged cache, slab starts for the contiguous one). Each layer writes through
``kv_cache.write`` and attends through ``ops.attention`` (§4.1: the kernel fetches the context's
blocks wherever they are), with the same two lines for both caches.

The step's tokens come packed, sequence after sequence, with no padding: ``input_ids`` and
``positions`` are ``[T]``, and every activation is ``[T, ...]``. Nothing here reads a device
tensor back to the host, so the engine can capture a decode step in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from minipaged import ops
from minipaged.kv import KVCache
from minipaged.ops import AttentionMetadata

# Rotary variants whose frequencies depend on the position alone, so one table serves every step
# (longrope only up to original_max_position_embeddings: see ModelConfig.from_hf).
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model: what the network and the KV cache are sized by."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads: = num_heads (MHA), a divisor of it (GQA), 1 (MQA)
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any]  # transformers' name: rope_theta, rope_type and the scaling's own keys
    max_position_embeddings: int  # positions the rotary table covers: the longest sequence the model serves
    tie_word_embeddings: bool  # the output head reuses the token embedding
    eos_token_ids: tuple[int, ...] = ()  # a sequence ends after any of these (none: only at its length limit)
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf_config: Any, generation_config: Any = None) -> ModelConfig:
        """The config of a transformers Llama model; ValueError for what this network does not run.

        The end-of-sequence ids come from ``generation_config`` when it names them: an instruct
        model often stops at more tokens there than its config.json lists.
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type != "llama":
            raise ValueError(f"minipaged runs Llama models (model_type 'llama'), got model_type {model_type!r}")
        for name, allowed in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)]:
            if getattr(hf_config, name, allowed) != allowed:
                raise ValueError(f"minipaged's Llama needs {name}={allowed!r}, got {getattr(hf_config, name)!r}")
        rope = dict(hf_config.rope_parameters)  # transformers 5 keeps rope_theta and the scaling here
        max_positions = hf_config.max_position_embeddings
        if rope["rope_type"] == "longrope":
            # transformers switches every position to the long factors once a sequence outgrows
            # original_max_position_embeddings (a rule of the running length): serve only the
            # positions where it uses the short ones, and pin the factor it derived from the full length.
            rope.setdefault("factor", max_positions / rope["original_max_position_embeddings"])
            max_positions = rope["original_max_position_embeddings"]
        eos = getattr(generation_config, "eos_token_id", None)
        eos = hf_config.eos_token_id if eos is None else eos
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads,
            head_dim=hf_config.head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=max_positions,
            tie_word_embeddings=hf_config.tie_word_embeddings,
            eos_token_ids=tuple([] if eos is None else [eos] if isinstance(eos, int) else eos),
            bos_token_id=hf_config.bos_token_id,
        )

    def __post_init__(self) -> None:
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type == "dynamic":
            raise ValueError(
                "rope_type 'dynamic' (dynamic NTK) rescales the frequencies with the running sequence "
                f"length, which one precomputed table cannot follow; supported: {', '.join(ROPE_TYPES)}"
            )
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


def rotary_tables(config: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin of every position's rotation angles, float32 ``[max_position_embeddings, head_dim // 2]``.

    The frequencies and the attention scaling (yarn's and longrope's temperature, folded into
    cos and sin as transformers does) come from transformers' own functions, so the variants
    cannot drift from the models they were trained with.
    """
    hf_config = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),  # a copy: transformers fills in defaults in place
    )
    rope_type = config.rope_parameters["rope_type"]
    # transformers' LlamaRotaryEmbedding makes the same choice.
    if rope_type == "default":
        inv_freq, attention_scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)  # [D/2]
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)  # [D/2]
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device=inv_freq.device)
    angles = positions[:, None] * inv_freq.float()[None, :]  # [P, D/2]
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[i], x[i + D/2]) of ``x [T, H, D]`` by its angle; ``cos``, ``sin``: ``[T, 1, D/2]``."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each: Llama pairs the two halves (transformers' rotate_half)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [T, H, D]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # The mean of squares in float32 (bf16 keeps 8 bits of mantissa), the scale in the model's dtype, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which of the cache's per-layer K/V tensors this layer owns
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache, metadata: AttentionMetadata) -> Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # The new tokens' K/V join their sequences' context first, so each attends to itself too.
        kv_cache.write(self.layer, metadata.slot_mapping, k, v)
        out = ops.attention(q, kv_cache.k_caches[self.layer], kv_cache.v_caches[self.layer], metadata)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))  # [T, H * D] -> [T, hidden]


class MLP(nn.Module):
    """SwiGLU: a SiLU-gated linear unit."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache, metadata: AttentionMetadata) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, metadata)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The network. Its parameters carry transformers' names, less the ``model.`` prefix, so a
    transformers state dict loads into it as it is (see ``minipaged.model.loader``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One table for every position the model serves, indexed per step: no host work, no sync.
        # Buffers follow .to(): in bfloat16 the table holds what transformers' cos/sin round to.
        cos, sin = rotary_tables(config)
        self.register_buffer("cos", cos, persistent=False)  # [P, D/2]
        self.register_buffer("sin", sin, persistent=False)  # [P, D/2]
        self.requires_grad_(False)  # inference only: no autograd graph through the cache writes

    def forward(self, input_ids: Tensor, positions: Tensor, kv_cache: KVCache, metadata: AttentionMetadata) -> Tensor:
        """Final-normed hidden states ``[T, hidden]`` of one step's new tokens.

        ``input_ids``, ``positions``: int64 ``[T]``, packed sequence after sequence as ``metadata``
        describes. Writes every layer's K/V of these tokens into ``kv_cache``.
        """
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.cos[positions, None], self.sin[positions, None]  # [T, 1, D/2]: shared by a token's heads
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """float32 ``[N, vocab]`` scores of the next token from hidden states ``[N, hidden]``."""
        return self.lm_head(hidden).float()
