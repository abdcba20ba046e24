"""The decoder layer's elementwise work in three Triton kernels: RMSNorm (with the residual add),
the rotary embedding, SwiGLU's gate.

Why fuse: a decode step of a small model moves few bytes per layer, so what bounds it is not
memory bandwidth but the *number* of kernels. Written in PyTorch, every elementwise operation is
a kernel of its own, and even replayed from a CUDA graph each costs ~1.5-3 us of GPU time
(launch, ramp-up, tail) however little it computes. Llama's RMSNorm is eight of them in bfloat16
(``float``, ``pow``, ``mean``, ``+ eps``, ``rsqrt``, ``*``, ``to``, ``* weight``), the rotary
embedding seven per tensor (four products, a difference, a sum, a ``cat``), SwiGLU two, each
residual add one: 43 kernels per layer, of which only 9 are the matrix products, the cache write
and attention. For a 1B model (16 layers) the 34 others are ~550 launches, about 2 ms of a ~3 ms
step at batch 16. Here each group is one kernel that reads its inputs once and writes its outputs
once: 13 launches per layer instead of 43 (vLLM and nano-vllm fuse the same groups), 10 once
the model stacks its Q, K, V and its gate, up products (``minipaged.model.llama``), and 9 with the
rotation inside the cache write (``triton_cache``: the model calls ``ops.rotary_and_write``).

Each kernel rounds where PyTorch rounds, so the model still computes what transformers computes:

* ``rms_norm``: one program per token, the whole row in one block (``HIDDEN_PAD``, the hidden
  size rounded up to a power of two, masked). LlamaRMSNorm's order: normalise in float32, round
  to x's dtype, multiply by the weight and round again. With ``RESIDUAL`` (vLLM's fused add +
  norm) the program first forms ``x + residual``, rounded to x's dtype as a PyTorch add would
  be, normalises that and also stores it: it is the residual stream of the next sublayer.
* ``rotary``: one program per token rotates, in place, all its query heads and then all its key
  heads, so the cos and sin of its position are fetched from the tables once (by position,
  inside the kernel: the model never gathers them per step). Llama pairs element ``i`` of a head
  with element ``i + D/2`` (transformers' ``rotate_half``); the rotation is computed in float32
  and rounded once. It is compiled without fused multiply-add (``enable_fp_fusion=False``), so a
  GPU computes the reference's float32 values bit for bit. The model runs the same rotation
  (``rotary_angles``, ``rotate_heads``) inside its cache write; ``ops.rotary`` is the op on its own.
* ``silu_and_mul``: program ``(t, j)`` handles ``BLOCK`` columns of row ``t`` of ``[T, I]``;
  gate and up are read through their row strides, so they can be the two halves of one product.
  ``silu(gate)`` in float32 rounded to the dtype (as ``F.silu`` does), then the product with
  ``up`` rounded again (as ``*`` does).

What may differ from PyTorch are float32 steps: the norm's sum runs in another order, and a GPU's
``rsqrt``, ``exp`` and division are fast approximations. A few float32 ulps, enough to tip a
rounding to float16 or bfloat16 the other way now and then (``tests/test_ops.py`` states the
tolerances). Rows are addressed in int64, so tensors past 2**31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from minipaged.ops.launch import cdiv, launch, next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    eps,
    HIDDEN: tl.constexpr,
    HIDDEN_PAD: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * HIDDEN
    cols = tl.arange(0, HIDDEN_PAD)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
    if RESIDUAL:
        residual = tl.load(residual_ptr + row + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)  # padded columns add 0
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty)  # LlamaRMSNorm rounds here, before the weight
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (weight * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Triton version of ``reference.rms_norm`` (arguments already checked, see ``checks``)."""
    x, weight = x.contiguous(), weight.contiguous()
    hidden = x.shape[1]
    hidden_pad = next_power_of_2(hidden)
    out = torch.empty_like(x)
    total = out if residual is None else torch.empty_like(x)  # x + residual, when there is one
    launch(
        _rms_norm_kernel, (x.shape[0],),
        (x, x if residual is None else residual.contiguous(), weight, out, total, eps),
        HIDDEN=hidden,
        HIDDEN_PAD=hidden_pad,
        RESIDUAL=residual is not None,
        num_warps=max(1, min(16, hidden_pad // 512)),
    )  # fmt: skip
    return out if residual is None else (out, total)


@triton.jit
def rotate_heads(
    x_ptr, row, stride_head, out_ptr, out_row, stride_out_head, cos, sin,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    """Rotate every head of the token whose row starts at ``row``: the pair (x[i], x[i + HALF]) by
    the angle whose ``cos``, ``sin`` (``[1, HALF_PAD]``) are given, rounded to x's dtype and
    stored at ``out_row`` of ``out_ptr`` (in place when that is the same row; in another dtype,
    rounded again). ``triton_cache.write_to_cache(..., rotary=...)`` stores a token's keys into the
    cache so."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = x_ptr + row + heads * stride_head + dims  # [HEADS_PAD, HALF_PAD]: each head's first half
    out = out_ptr + out_row + heads * stride_out_head + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(out, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_angles(cos_ptr, sin_ptr, positions_ptr, token, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos and sin ``[1, HALF_PAD]`` of the token's position, looked up in the tables."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + position * HALF + dims, mask=dims < HALF, other=0.0)[None, :]  # shared by every head
    sin = tl.load(sin_ptr + position * HALF + dims, mask=dims < HALF, other=0.0)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    stride_q_token, stride_q_head,
    stride_k_token, stride_k_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cos, sin = rotary_angles(cos_ptr, sin_ptr, positions_ptr, token, HALF, HALF_PAD)
    q_row, k_row = token * stride_q_token, token * stride_k_token
    rotate_heads(
        q_ptr, q_row, stride_q_head, q_ptr, q_row, stride_q_head, cos, sin, NUM_HEADS, HEADS_PAD, HALF, HALF_PAD
    )
    rotate_heads(
        k_ptr, k_row, stride_k_head, k_ptr, k_row, stride_k_head, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD
    )


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of ``reference.rotary``: rotates ``q`` and ``k`` in place and returns them.
    Their head dimension must be contiguous (the other strides are free)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    launch(
        _rotary_kernel, (num_tokens,),
        (q, k, cos.contiguous(), sin.contiguous(), positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1)),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=next_power_of_2(num_heads),
        KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
        HALF_PAD=next_power_of_2(head_dim // 2),
        enable_fp_fusion=False,  # no fused multiply-add: the reference's float32 values exactly
    )  # fmt: skip
    return q, k


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, width, BLOCK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(0).to(tl.int64)
    mask = cols < width
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)  # F.silu rounds to the dtype
    tl.store(out_ptr + row * width + cols, (silu.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    """Triton version of ``reference.silu_and_mul`` (arguments already checked, see ``checks``).
    ``gate`` and ``up`` may be views with any row stride, such as the two halves of the model's
    fused gate/up product; the output is a new contiguous ``[T, I]``."""
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        gate, up = gate.contiguous(), up.contiguous()
    num_tokens, width = gate.shape
    out = torch.empty((num_tokens, width), dtype=gate.dtype, device=gate.device)
    block = 1024
    # The kernel gets the row width and strides, not the element count: they are the model's, so
    # every step reuses one launch key (see ``launch``), however many tokens it has.
    launch(
        _silu_and_mul_kernel, (num_tokens, cdiv(width, block)),
        (gate, up, out, gate.stride(0), up.stride(0), width),
        BLOCK=block,
    )  # fmt: skip
    return out
