"""Plain-PyTorch specifications of the kernels in ``minipaged.ops``.

Each function here takes the arguments of the public op of the same name (less launch hints
such as ``max_context_len``) and is written to be read, not to be fast: attention gathers one
token at a time through the block table, exactly as the paper describes the lookup (§4.1,
"PagedAttention"), and computes the softmax in float32 (float64 when the inputs are float64).
The tests compare the Triton kernels with these functions, and the public functions fall back
to them on a CPU or for any case the kernels do not cover. The decoder layer's elementwise ops
(``rms_norm``, ``rotary``, ``rotary_and_write``, ``silu_and_mul``, at the end) are what the model computed in PyTorch
before they were fused, rounding where it rounded. (``swap_blocks`` is a transfer, not
a kernel: its one implementation is ``minipaged.ops.swap``.)

Cache layout (how ``minipaged.kv`` hands its tensors to the ops): per layer ``k_cache`` and
``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot ``s`` is row
``s % block_size`` of block ``s // block_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minipaged.ops.metadata import AttentionMetadata


def _slots(cache: Tensor) -> Tensor:
    """View a ``[num_blocks, block_size, H_kv, D]`` cache as ``[num_slots, H_kv, D]``."""
    return cache.flatten(0, 1)


def write_to_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter new tokens' K/V rows into their slots (§5.1, fused reshape-and-write).

    ``key``/``value`` are ``[T, H_kv, D]``; token ``t`` goes to slot ``slot_mapping[t]``;
    slot ``-1`` means "do not store this token" (padding).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(k_cache.device).long()
    keep = keep.to(key.device)
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size  # indexing in place: any strides
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def copy_blocks(k_caches: list[Tensor], v_caches: list[Tensor], block_mapping: Tensor) -> None:
    """Copy whole blocks ``src -> dst`` in every layer (§4.4, copy-on-write).

    ``block_mapping`` is an integer ``[n, 2]`` tensor of (src, dst) pairs. No destination may also be a
    source (copy-on-write never chains copies): the Triton version copies all pairs at once.
    """
    for cache in (*k_caches, *v_caches):
        mapping = block_mapping.to(cache.device)
        cache[mapping[:, 1]] = cache[mapping[:, 0]]


def _softmax_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attend(q: Tensor, keys: Tensor, values: Tensor, scale: float, causal_offset: int | None) -> Tensor:
    """Attention of ``q [n, H, D]`` over ``keys/values [L, H_kv, D]`` for one sequence.

    With ``causal_offset`` set, query ``j`` sits at position ``causal_offset + j`` and sees
    keys ``0 .. causal_offset + j``; otherwise every query sees every key.
    """
    dtype = _softmax_dtype(q)
    group = q.shape[1] // keys.shape[1]
    k = keys.to(dtype).repeat_interleave(group, dim=1)  # [L, H, D]
    v = values.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.to(dtype), k) * scale
    if causal_offset is not None:
        query_pos = causal_offset + torch.arange(q.shape[0], device=q.device)
        key_pos = torch.arange(keys.shape[0], device=q.device)
        scores = scores.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


def _gather_sequence(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The first ``length`` tokens of one sequence, looked up token by token (§4.1)."""
    block_size = k_cache.shape[1]
    positions = torch.arange(length, device=k_cache.device)
    blocks = block_table.to(k_cache.device).long()[positions // block_size]
    slots = blocks * block_size + positions % block_size
    return _slots(k_cache)[slots], _slots(v_cache)[slots]


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """One new query token per sequence attends to its whole context through its block table (§4.1)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for seq, length in enumerate(context_lens.tolist()):
        keys, values = _gather_sequence(k_cache, v_cache, block_tables[seq], length)
        out[seq] = _attend(q[seq : seq + 1], keys, values, scale, None)[0]
    return out


def contiguous_decode_attention(
    q: Tensor,
    k_arena: Tensor,
    v_arena: Tensor,
    starts: Tensor,
    context_lens: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """Decode attention over contiguous slabs: sequence ``i`` owns arena rows ``starts[i]..``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for seq, (start, length) in enumerate(zip(starts.tolist(), context_lens.tolist(), strict=True)):
        rows = slice(start, start + length)
        out[seq] = _attend(q[seq : seq + 1], k_arena[rows], v_arena[rows], scale, None)[0]
    return out


def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    query_start_loc: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """Causal attention of packed new tokens over their sequences' cached context (§4.1, §4.4).

    Sequence ``s`` has queries ``q[query_start_loc[s] : query_start_loc[s + 1]]``; its
    ``n_new`` new tokens occupy the last positions ``context_lens[s] - n_new ..`` and each
    sees every earlier position plus itself (prefix caching, chunked prefill, recompute).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = query_start_loc.tolist()
    for seq, length in enumerate(context_lens.tolist()):
        first, last = bounds[seq], bounds[seq + 1]
        if last == first:
            continue
        keys, values = _gather_sequence(k_cache, v_cache, block_tables[seq], length)
        out[first:last] = _attend(q[first:last], keys, values, scale, length - (last - first))
    return out


def attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, metadata: AttentionMetadata, *, scale: float | None = None
) -> Tensor:
    """One step's new tokens over their context, for either cache (``ops.attention``).

    A contiguous arena ``[num_slots, H_kv, D]`` is a pool of one-slot blocks, and a slab is the
    run of blocks ``starts[s], starts[s] + 1, ...``: so the paged specifications serve both caches.
    """
    tables = metadata.block_tables
    if tables is None:
        k_cache, v_cache = k_cache.unsqueeze(1), v_cache.unsqueeze(1)  # [num_slots, 1, H_kv, D]
        positions = torch.arange(metadata.max_context_len, device=q.device, dtype=torch.int32)
        tables = metadata.starts[:, None] + positions  # [S, max_context_len]
    if metadata.is_decode:
        return paged_decode_attention(q, k_cache, v_cache, tables, metadata.context_lens, scale=scale)
    return paged_prefill_attention(
        q, k_cache, v_cache, tables, metadata.context_lens, metadata.query_start_loc, scale=scale
    )


# -- the decoder layer's elementwise ops (fused in ``triton_layers``; ``rotary_and_write`` in
# ``triton_cache``) and the sampler's greedy pick (``triton_sampling``) ---------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """transformers' LlamaRMSNorm of ``x [T, hidden]``: normalise in float32, round to x's dtype,
    then scale by ``weight [hidden]`` in that dtype.

    With ``residual`` (vLLM's fused add + norm) the norm is of ``x + residual``, added in x's
    dtype, and that sum is returned too: ``(normed, sum)``.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q [T, H, D]`` and ``k [T, H_kv, D]`` in place by each token's position; returns them.

    Element ``i`` of a head pairs with element ``i + D/2`` (transformers' ``rotate_half``) and the
    pair turns by the angle whose cosine and sine are ``cos[position, i]``, ``sin[position, i]``
    (float32 tables ``[P, D/2]``), computed in float32 and rounded once.
    """
    cos, sin = cos[positions, None], sin[positions, None]  # [T, 1, D/2]: shared by a token's heads
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)  # [T, heads, D/2] each
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))  # [T, heads, D]
    return q, k


def rotary_and_write(
    q: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
) -> Tensor:  # fmt: skip
    """The model's cache write with the rotary embedding in it: ``rotary`` turns ``q`` in place
    and a copy of ``key`` (``key`` itself is left as it was), then ``write_to_cache`` stores the
    turned keys and the values. Returns ``q``."""
    q, key = rotary(q, key.clone(), cos, sin, positions)
    write_to_cache(key, value, k_cache, v_cache, slot_mapping)
    return q


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gate: ``silu(gate) * up`` for ``gate``, ``up`` ``[T, I]``."""
    return torch.nn.functional.silu(gate) * up


def greedy_sample(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy decoding's pick from ``logits [B, V]``: each row's most likely token (``int64 [B]``,
    the lowest index among equals) and its log-probability (``float32 [B]``, ``log_softmax`` of
    the row in float32)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
