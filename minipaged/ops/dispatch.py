"""Public entry points of ``minipaged.ops``: check, choose the backend, call.

Every public function takes the same three steps, each done in one place:

1. check its arguments with ``checks.check_<name of the op>`` (a ``ValueError`` naming the
   argument); nothing after it checks again;
2. choose the backend with ``_use_triton``, the one choice for every op: the Triton kernel when
   Triton runs on the tensors' device (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``, how
   the tests drive the kernels without a GPU) and the kernel covers the call; otherwise the
   plain-PyTorch reference in ``reference.py``. The choice is logged at debug level;
3. call it.

``swap_blocks`` has nothing to choose: a swap is a transfer, with one implementation
(``swap.py``) on every device.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from minipaged.ops import reference, swap, triton_attention, triton_cache, triton_layers, triton_sampling
from minipaged.ops.checks import (
    check_attention,
    check_contiguous_decode_attention,
    check_copy_blocks,
    check_greedy_sample,
    check_paged_decode_attention,
    check_paged_prefill_attention,
    check_rms_norm,
    check_rotary,
    check_rotary_and_write,
    check_silu_and_mul,
    check_swap_blocks,
    check_write_to_cache,
)
from minipaged.ops.metadata import AttentionMetadata

logger = logging.getLogger("minipaged.ops")


def triton_available(tensor: Tensor) -> bool:
    """Whether Triton can run on this tensor's device. (``Tensor.is_cuda`` and ``is_cpu``, not
    ``tensor.device.type``: that builds a device object and costs ~0.8 us, every call.)"""
    return tensor.is_cuda or (tensor.is_cpu and os.environ.get("TRITON_INTERPRET") == "1")


def _use_triton(op: str, tensor: Tensor, not_covered: str | None = None) -> bool:
    """The backend choice of every op: Triton when it runs on ``tensor``'s device and the kernel
    covers the call (``not_covered``, when given, says why it does not); else the reference. Logged."""
    why = not_covered
    if why is None and not triton_available(tensor):
        why = f"{tensor.device.type} tensors without TRITON_INTERPRET=1"
    if why is None:
        logger.debug("%s: triton", op)
        return True
    logger.debug("%s: reference (%s)", op, why)
    return False


def _attention_not_covered(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the attention kernel cannot take this call, or None when it can."""
    num_tokens, _, head_dim = q.shape
    if q.dtype == torch.float64:
        return "float64 has no Triton matrix product"
    if not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} outside 16..256"
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head dimension of the cache not contiguous"
    if num_tokens == 0:
        return "empty batch"
    return None


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def write_to_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store ``key``/``value [T, H_kv, D]`` at slots ``slot_mapping [T]`` (-1 = skip), §5.1."""
    key, value, k_cache, v_cache, slots = check_write_to_cache(key, value, k_cache, v_cache, slot_mapping)
    strided = any(t.stride(-1) != 1 for t in (key, value, k_cache, v_cache))
    if _use_triton("write_to_cache", k_cache, "head dimension not contiguous" if strided else None):
        triton_cache.write_to_cache(key, value, k_cache, v_cache, slots)
    else:
        reference.write_to_cache(key, value, k_cache, v_cache, slots)


def copy_blocks(k_caches: list[Tensor], v_caches: list[Tensor], block_mapping: Tensor) -> None:
    """Copy blocks ``block_mapping[:, 0] -> block_mapping[:, 1]`` in every layer (copy-on-write, §4.4)."""
    mapping = check_copy_blocks(k_caches, v_caches, block_mapping)
    if mapping is None:  # no layers
        return
    contiguous = all(cache.is_contiguous() for cache in (*k_caches, *v_caches))
    if _use_triton("copy_blocks", k_caches[0], None if contiguous else "caches not contiguous"):
        triton_cache.copy_blocks(k_caches, v_caches, mapping)
    else:
        reference.copy_blocks(k_caches, v_caches, mapping)


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Move blocks between caches on any two devices: gather, one transfer, scatter (§4.5)."""
    src, dst, mapping = check_swap_blocks(src, dst, block_mapping)
    logger.debug("swap_blocks: torch (gather, one transfer, scatter)")
    swap.swap_blocks(src, dst, mapping)


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    *,
    scale: float | None = None,
    max_context_len: int | None = None,
) -> Tensor:
    """One query token per sequence over its paged context (§4.1); returns ``[num_seqs, H, D]``.

    ``max_context_len`` (optional) bounds ``context_lens`` and sizes the split-K grid; by
    default it is the block tables' capacity, which needs no GPU sync.
    """
    q, k_cache, v_cache, tables, lens = check_paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, max_context_len
    )
    scale = _scale(q, scale)
    if not _use_triton("paged_decode_attention", q, _attention_not_covered(q, k_cache, v_cache)):
        return reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=scale)
    bound = tables.shape[1] * k_cache.shape[1] if max_context_len is None else max_context_len
    return triton_attention.attention(
        q, k_cache, v_cache, block_tables=tables, context_lens=lens, max_context_len=bound, scale=scale
    )


def contiguous_decode_attention(
    q: Tensor,
    k_arena: Tensor,
    v_arena: Tensor,
    starts: Tensor,
    context_lens: Tensor,
    *,
    scale: float | None = None,
    max_context_len: int | None = None,
) -> Tensor:
    """The same decode attention over one contiguous slab per sequence (the paper's baseline).

    ``max_context_len`` (optional) bounds ``context_lens``; without it the maximum is read
    from ``context_lens`` (a GPU sync).
    """
    q, k_arena, v_arena, starts, lens = check_contiguous_decode_attention(
        q, k_arena, v_arena, starts, context_lens, max_context_len
    )
    scale = _scale(q, scale)
    if not _use_triton("contiguous_decode_attention", q, _attention_not_covered(q, k_arena, v_arena)):
        return reference.contiguous_decode_attention(q, k_arena, v_arena, starts, lens, scale=scale)
    bound = int(lens.max()) if max_context_len is None else max_context_len
    return triton_attention.attention(
        q, k_arena, v_arena, starts=starts, context_lens=lens, max_context_len=bound, scale=scale
    )


def paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    query_start_loc: Tensor,
    *,
    scale: float | None = None,
    max_context_len: int | None = None,
    max_query_len: int | None = None,
) -> Tensor:
    """Causal attention of packed new tokens over their paged context (§4.1, §4.4).

    Query ``j`` of sequence ``s`` sits at position ``context_lens[s] - n_new + j`` and sees
    every position up to its own; its K/V must already be in the cache.

    ``max_context_len`` and ``max_query_len`` (optional, together) bound the longest context and
    the most new tokens of a sequence, and size the grid. Without them the call reads the index
    tensors back to find them (a GPU sync); with them it reads nothing back and a CUDA graph can
    capture it.
    """
    q, k_cache, v_cache, tables, lens, query_starts, max_context_len, max_query_len = check_paged_prefill_attention(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, max_context_len, max_query_len
    )
    scale = _scale(q, scale)
    if not _use_triton("paged_prefill_attention", q, _attention_not_covered(q, k_cache, v_cache)):
        return reference.paged_prefill_attention(q, k_cache, v_cache, tables, lens, query_starts, scale=scale)
    return triton_attention.attention(
        q, k_cache, v_cache, block_tables=tables, context_lens=lens, query_start_loc=query_starts,
        max_context_len=max_context_len, max_query_len=max_query_len, scale=scale,
    )  # fmt: skip


def attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, metadata: AttentionMetadata, *, scale: float | None = None
) -> Tensor:
    """Attention of one step's new tokens ``q [T, H, D]`` over their sequences' cached context.

    The engine's entry point: one call per layer for paged and contiguous caches, decode and
    prefill alike (``metadata`` says which, see ``minipaged.ops.metadata``). ``k_cache`` is the
    paged pool ``[num_blocks, block_size, H_kv, D]`` or the contiguous arena ``[num_slots, H_kv,
    D]``. The new tokens' K/V must already be written. Shapes are checked; the index values are
    not, because ``metadata`` comes from a cache, which built it valid, and reading them would
    stall the GPU once per layer. So on a GPU this call neither reads GPU tensors back nor
    allocates by their values: a CUDA graph can capture it. Decode is planned for a server's
    batch, whose lengths differ (``triton_attention._launch_config``).
    """
    q, k_cache, v_cache = check_attention(q, k_cache, v_cache, metadata)
    scale = _scale(q, scale)
    cache = "paged" if metadata.block_tables is not None else "contiguous"
    op = f"attention ({cache}, {'decode' if metadata.is_decode else 'prefill'})"
    if not _use_triton(op, q, _attention_not_covered(q, k_cache, v_cache)):
        return reference.attention(q, k_cache, v_cache, metadata, scale=scale)
    return triton_attention.attention(
        q, k_cache, v_cache, block_tables=metadata.block_tables, starts=metadata.starts,
        context_lens=metadata.context_lens, query_start_loc=metadata.query_start_loc,
        max_context_len=metadata.max_context_len, max_query_len=metadata.max_query_len, scale=scale,
        varied_lengths=True,
    )  # fmt: skip


# -- the decoder layer's elementwise ops (``triton_layers``, and ``triton_cache`` for the model's write:
# one kernel each instead of 2-14) ----------------------------------------------------------------

MAX_FUSED_HIDDEN = 65536  # rms_norm holds a whole row in one block


def _float64_not_covered(x: Tensor) -> str | None:
    return "float64 (the kernels compute in float32)" if x.dtype == torch.float64 else None


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LlamaRMSNorm of ``x [T, hidden]`` with ``weight [hidden]`` (normalised in float32, rounded to
    x's dtype, then scaled by the weight). With ``residual [T, hidden]``, the norm of ``s = x +
    residual`` (added in x's dtype), returned as ``(rms_norm(s), s)``: a decoder layer's residual
    add and the next norm in one kernel. New tensors; the inputs are not modified."""
    x, weight, residual = check_rms_norm(x, weight, eps, residual)
    too_wide = f"hidden size above {MAX_FUSED_HIDDEN}" if x.shape[1] > MAX_FUSED_HIDDEN else None
    if _use_triton("rms_norm", x, _float64_not_covered(x) or too_wide):
        return triton_layers.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of ``q [T, H, D]`` and ``k [T, H_kv, D]`` IN PLACE, returning them.

    Llama's pairing (element ``i`` with ``i + D/2``), by the angles of each token's position
    ``positions [T]``, looked up in the float32 tables ``cos``, ``sin`` ``[P, D/2]``; computed in
    float32 and rounded once. The caller must not need the unrotated values.
    """
    q, k, cos, sin, positions = check_rotary(q, k, cos, sin, positions)
    strided = "head dimension not contiguous" if q.stride(-1) != 1 or k.stride(-1) != 1 else None
    if _use_triton("rotary", q, _float64_not_covered(q) or strided):
        return triton_layers.rotary(q, k, cos, sin, positions)
    return reference.rotary(q, k, cos, sin, positions)


def rotary_and_write(
    q: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
) -> Tensor:  # fmt: skip
    """``rotary`` and ``write_to_cache`` in one kernel, the model's write: ``q [T, H, D]`` turns IN
    PLACE and is returned; ``key [T, H_kv, D]`` turns on its way into its slots (``key`` itself is
    not modified) and ``value`` is stored beside it. Arguments as those two ops take them."""
    q, key, value, cos, sin, positions, k_cache, v_cache, slots = check_rotary_and_write(
        q, key, value, cos, sin, positions, k_cache, v_cache, slot_mapping
    )
    strided = any(t.stride(-1) != 1 for t in (q, key, value, k_cache, v_cache))
    not_covered = _float64_not_covered(q) or ("head dimension not contiguous" if strided else None)
    if _use_triton("rotary_and_write", q, not_covered):
        triton_cache.write_to_cache(key, value, k_cache, v_cache, slots, rotary=(q, cos, sin, positions))
        return q
    return reference.rotary_and_write(q, key, value, cos, sin, positions, k_cache, v_cache, slots)


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gate, ``silu(gate) * up`` for ``gate``, ``up`` ``[T, I]``, in one kernel."""
    gate, up = check_silu_and_mul(gate, up)
    if _use_triton("silu_and_mul", gate, _float64_not_covered(gate)):
        return triton_layers.silu_and_mul(gate, up)
    return reference.silu_and_mul(gate, up)


# -- the sampler's greedy pick (``triton_sampling``: one kernel instead of four) ----------------------


def greedy_sample(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's most likely token of ``logits [B, V]`` (``int64 [B]``, the lowest index among
    equal logits, as ``torch.argmax``) and its log-probability under ``log_softmax`` of the row
    (``float32 [B]``), reading the logits once in their own dtype."""
    logits = check_greedy_sample(logits)
    strided = "vocabulary dimension not contiguous" if logits.stride(-1) != 1 else None
    if _use_triton("greedy_sample", logits, _float64_not_covered(logits) or strided):
        return triton_sampling.greedy_sample(logits)
    return reference.greedy_sample(logits)
