"""Cache-maintenance kernels of §5.1: fused reshape-and-write, and block copy.

* ``write_to_cache``: after the QKV projection each new token's key and value rows are
  scattered into their slots of the block pool in one launch (the paper's "fused
  reshape and block write"): one program per token, slot ``-1`` skips the token.
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


@triton.jit
def _write_to_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_key_token, stride_key_head,
    stride_value_token, stride_value_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    row = token.to(tl.int64)
    key = tl.load(key_ptr + row * stride_key_token + heads * stride_key_head + dims, mask=mask)
    value = tl.load(value_ptr + row * stride_value_token + heads * stride_value_head + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_k_block + offset * stride_k_slot + heads * stride_k_head + dims
    v_dst = v_cache_ptr + block * stride_v_block + offset * stride_v_slot + heads * stride_v_head + dims
    tl.store(k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_to_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Triton version of ``reference.write_to_cache`` (arguments already checked, see ``checks``)."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    launch(
        _write_to_cache_kernel, (num_tokens,),
        (
            key, value, k_cache, v_cache, slot_mapping,
            key.stride(0), key.stride(1),
            value.stride(0), value.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_heads),
        DIM_PAD=next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
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
