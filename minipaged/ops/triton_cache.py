"""Cache-maintenance kernels of §5.1: fused reshape-and-write, and block copy.

* ``write_to_cache``: after the QKV projection each new token's key and value rows are
  scattered into their slots of the block pool in one launch (the paper's "fused
  reshape and block write"): one program per token, slot ``-1`` skips the token.
  The same kernel with ``ROTARY`` (constexpr) is the model's write, ``rotary_and_write``: the
  rotary embedding fused in (``triton_layers``' rotation, at each token's position), each
  program turns its token's query heads in place and its key heads on their way into the cache.
  A decode step of a small model costs a few microseconds per kernel whatever the kernel does,
  and this saves one per layer (30 of SmolLM2's ~310 per step).
* ``copy_blocks``: copy-on-write (§4.4) copies whole blocks; one launch per layer copies
  every (src, dst) pair of that layer's K and V caches ("fused block copy": many small
  copies batched into one kernel instead of one ``cudaMemcpy`` each).

Offsets are int64: slots and blocks of large pools overflow int32 once multiplied by strides.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from minipaged.ops.launch import cdiv, launch, next_power_of_2
from minipaged.ops.triton_layers import rotary_angles, rotate_heads


@triton.jit
def _copy_heads(
    src_ptr, src_row, stride_src_head, dst_ptr, dst_row, stride_dst_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    """Copy a token's ``[NUM_HEADS, HEAD_DIM]`` row (heads strided, dims contiguous), in the destination's dtype."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    row = tl.load(src_ptr + src_row + heads * stride_src_head + dims, mask=mask)
    tl.store(dst_ptr + dst_row + heads * stride_dst_head + dims, row.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_to_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    q_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    stride_key_token, stride_key_head,
    stride_value_token, stride_value_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_q_token, stride_q_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROTARY: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
):  # fmt: skip
    """One program per token. ``ROTARY``: the rotary embedding too (``q`` turned in place, the
    keys turned on their way into the cache; ``q``, the tables and the positions are read only then)."""
    token = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    HALF_PAD: tl.constexpr = DIM_PAD // 2
    if ROTARY:
        cos, sin = rotary_angles(cos_ptr, sin_ptr, positions_ptr, token, HALF, HALF_PAD)
        q_row = token * stride_q_token
        rotate_heads(
            q_ptr, q_row, stride_q_head, q_ptr, q_row, stride_q_head, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD
        )
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    key_row, k_row = token * stride_key_token, block * stride_k_block + offset * stride_k_slot
    if ROTARY:
        rotate_heads(
            key_ptr, key_row, stride_key_head, k_cache_ptr, k_row, stride_k_head, cos, sin,
            NUM_HEADS, HEADS_PAD, HALF, HALF_PAD,
        )  # fmt: skip
    else:
        _copy_heads(key_ptr, key_row, stride_key_head, k_cache_ptr, k_row, stride_k_head,
                    NUM_HEADS, HEAD_DIM, HEADS_PAD, DIM_PAD)  # fmt: skip
    _copy_heads(
        value_ptr, token * stride_value_token, stride_value_head,
        v_cache_ptr, block * stride_v_block + offset * stride_v_slot, stride_v_head,
        NUM_HEADS, HEAD_DIM, HEADS_PAD, DIM_PAD,
    )  # fmt: skip


def write_to_cache(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
    rotary: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> None:  # fmt: skip
    """Triton version of ``reference.write_to_cache`` (arguments already checked, see ``checks``);
    with ``rotary=(q, cos, sin, positions)``, of ``reference.rotary_and_write`` (``key`` is left
    as it was, ``q`` turns in place)."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if rotary is None:  # the rotary embedding's pointers are left unread: any tensor at hand will do
        q, cos, sin, positions = key, key, key, slot_mapping
    else:
        q, cos, sin, positions = rotary[0], rotary[1].contiguous(), rotary[2].contiguous(), rotary[3]
    launch(
        _write_to_cache_kernel, (num_tokens,),
        (
            key, value, k_cache, v_cache, slot_mapping, q, cos, sin, positions,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            *k_cache.stride()[:3], *v_cache.stride()[:3], q.stride(0), q.stride(1),
        ),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_heads),
        DIM_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        ROTARY=rotary is not None,
        NUM_Q_HEADS=q.shape[1],
        Q_HEADS_PAD=next_power_of_2(q.shape[1]),
        enable_fp_fusion=False,  # no fused multiply-add: the rotary reference's float32 values exactly
    )  # fmt: skip


@triton.jit
def _copy_blocks_kernel(k_cache_ptr, v_cache_ptr, mapping_ptr, block_numel, CHUNK: tl.constexpr):
    """Program (pair, chunk) copies CHUNK elements of block src to block dst, in K and in V."""
    pair = tl.program_id(0)
    src = tl.load(mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(mapping_ptr + 2 * pair + 1).to(tl.int64)
    offsets = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < block_numel
    key = tl.load(k_cache_ptr + src * block_numel + offsets, mask=mask)
    value = tl.load(v_cache_ptr + src * block_numel + offsets, mask=mask)
    tl.store(k_cache_ptr + dst * block_numel + offsets, key, mask=mask)
    tl.store(v_cache_ptr + dst * block_numel + offsets, value, mask=mask)


def copy_blocks(k_caches: list[Tensor], v_caches: list[Tensor], block_mapping: Tensor) -> None:
    """Triton version of ``reference.copy_blocks``; caches must be contiguous.

    Sources and destinations must not overlap (copy-on-write never chains copies): programs
    of one launch run in any order.
    """
    if block_mapping.shape[0] == 0:
        return
    mapping = block_mapping.contiguous()
    for k_cache, v_cache in zip(k_caches, v_caches, strict=True):
        block_numel = k_cache[0].numel()
        chunk = min(4096, next_power_of_2(block_numel))
        grid = (mapping.shape[0], cdiv(block_numel, chunk))
        launch(_copy_blocks_kernel, grid, (k_cache, v_cache, mapping, block_numel), CHUNK=chunk)
