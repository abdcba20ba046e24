"""A Llama-family transformer whose attention reads and writes through a KV cache (paper §2, §4.1).

The paper's subject is the memory that holds the keys and values a transformer produces (§2):
every layer turns each new token into a query, a key and a value, keeps the key and value, and
lets the query attend over every kept key and value of its sequence. This file is that
transformer, small enough to read in one sitting (nanoGPT's shape, with Llama's parts: RMSNorm,
rotary position embeddings, grouped-query attention, a SwiGLU MLP).

The one idea: a layer never knows how the cache is laid out. The step's ``AttentionMetadata``
says where each new token's K/V goes (``slot_mapping``) and where every sequence's context lies
(block tables for the paged cache, slab starts for the contiguous one). Each layer writes through
``kv_cache.write_rotated`` and attends through ``ops.attention`` (§4.1: the kernel fetches the context's
blocks wherever they are), with the same two lines for both caches.

The elementwise work runs in fused kernels (``ops.rms_norm``, ``ops.silu_and_mul``, and the rotary
embedding inside the cache write, ``ops.rotary_and_write``):
a small model's decode step is bound by how many kernels it launches, not by bandwidth. So the
residual stream is carried beside the hidden states, as in vLLM: each layer receives the previous
sublayer's output and the stream separately, and the next norm adds them in its own kernel. For
the same reason the products that read the same input are stacked into one matrix, as vLLM's
``QKVParallelLinear`` and ``MergedColumnParallelLinear`` do: ``qkv_proj`` holds transformers'
``q_proj``, ``k_proj`` and ``v_proj`` one above the other, ``gate_up_proj`` holds ``gate_proj`` and
``up_proj``; the kernels after them read their parts as views. A layer is then nine kernels: two
norms, four products, the cache write with the rotary embedding, attention, SwiGLU's gate.

The step's tokens come packed, sequence after sequence, with no padding: ``input_ids`` and
``positions`` are ``[T]``, and every activation is ``[T, ...]``. Nothing here reads a device
tensor back to the host, so the engine can capture a decode step in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
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


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Llama's norm of ``x [T, hidden]`` (mean of squares in float32, scale in the model's dtype);
        with ``residual``, the norm of ``x + residual`` and that sum, the stream's next value."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which of the cache's per-layer K/V tensors this layer owns
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)  # q_proj; k_proj; v_proj
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # Views, not copies: every kernel below reads its part through the token stride.
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)  # [T, H | H_kv, D]
        # The new tokens' K/V join their sequences' context first, so each attends to itself too.
        # On the way the rotary embedding turns k (and q, in place) by the angles of each token's
        # position: one kernel (``ops.rotary_and_write``) instead of ``ops.rotary`` then ``kv_cache.write``.
        q = kv_cache.write_rotated(self.layer, metadata.slot_mapping, q, k, v, cos, sin, positions)
        out = ops.attention(q, kv_cache.k_caches[self.layer], kv_cache.v_caches[self.layer], metadata)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))  # [T, H * D] -> [T, hidden]


class MLP(nn.Module):
    """SwiGLU: a SiLU-gated linear unit."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # gate; up
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=1)  # [T, I] views of [T, 2I]
        return self.down_proj(ops.silu_and_mul(gate, up))  # [T, I] -> [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: Tensor,
        residual: Tensor | None,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> tuple[Tensor, Tensor]:
        """``residual + hidden`` is the layer's input (the first layer gets the embedding as
        ``hidden`` and no residual). Returns the MLP's output and the stream it is to be added to:
        each ``x = x + sublayer(norm(x))`` of the textbook, with the add moved into the next norm."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, cos, sin, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


# Stacked products: our parameter, and transformers' parameters it stacks (in that order).
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def from_hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers Llama state dict under ``Llama``'s names: the ``model.`` prefix dropped, and
    each group of ``STACKED`` weights concatenated along the output dimension into one."""
    ours = {name.removeprefix("model."): weight for name, weight in state_dict.items()}
    for stacked, parts in STACKED.items():
        for name in [name for name in ours if name.endswith(f".{parts[0]}.weight")]:
            prefix = name.removesuffix(f"{parts[0]}.weight")
            ours[f"{prefix}{stacked}.weight"] = torch.cat([ours.pop(f"{prefix}{part}.weight") for part in parts])
    return ours


class Llama(nn.Module):
    """The network. Its parameters carry transformers' names, less the ``model.`` prefix, except
    the stacked products (``STACKED``): ``from_hf_state_dict`` maps a transformers state dict onto
    them (see ``minipaged.model.loader``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One table for every position the model serves, read by the cache write at each token's
        # position: no host work, no sync. float32 whatever the model's dtype (see _apply).
        cos, sin = rotary_tables(config)
        self.register_buffer("cos", cos, persistent=False)  # [P, D/2]
        self.register_buffer("sin", sin, persistent=False)  # [P, D/2]
        self.requires_grad_(False)  # inference only: no autograd graph through the cache writes

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Llama:
        """``.to(dtype)``, ``.half()`` and the like cast every floating buffer: the rotary tables
        follow the model's device but stay float32, as ``ops.rotary_and_write`` computes in float32."""
        cos, sin = self.cos, self.sin
        super()._apply(fn, recurse)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self

    def forward(self, input_ids: Tensor, positions: Tensor, kv_cache: KVCache, metadata: AttentionMetadata) -> Tensor:
        """Final-normed hidden states ``[T, hidden]`` of one step's new tokens.

        ``input_ids``, ``positions``: int64 ``[T]``, packed sequence after sequence as ``metadata``
        describes. Writes every layer's K/V of these tokens into ``kv_cache``.
        """
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, self.cos, self.sin, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)  # the last layer's add, then the final norm
        return hidden

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Scores ``[N, vocab]`` of the next token from hidden states ``[N, hidden]``, in the model's
        dtype as transformers' ``LlamaForCausalLM`` returns them: the sampler reads them as they
        are (a float32 copy of a large batch's logits would cost more than its greedy pick)."""
        return self.lm_head(hidden)
