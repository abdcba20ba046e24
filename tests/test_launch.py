"""``minipaged.ops.launch``: the cached direct launch gives what Triton's own launch gives.

On a CPU the kernels run in Triton's interpreter, where every launch goes through
``kernel[grid]``; the ``gpu`` tests check the direct path against it, including what the cache
key must tell apart (a misaligned view is not served from the cache of aligned ones).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import minipaged.ops as ops
from minipaged.ops import launch, reference, triton_attention, triton_layers
from tests.test_ops import DEVICE, HAS_CUDA, gpu, needs_triton  # also sets TRITON_INTERPRET on a CPU


def test_the_key_tells_apart_what_triton_specialises_on():
    # (gate, up, out, stride_gate, stride_up, width): every runtime argument, as a launch gives them
    entry = launch._Kernel(triton_layers._silu_and_mul_kernel, (torch.zeros(1),) * 3 + (8, 8, 8))
    assert entry.num_tensors == 3
    base = torch.zeros(64, dtype=torch.float16)
    meta = {"BLOCK": 1024}

    def key(gate, width=64, block=1024):
        return entry.key(0, (gate, base, base, width, width, width), {"BLOCK": block})[0]

    assert key(base) == key(base.clone()) == key(base[8:])  # 16 bytes in: still aligned
    assert key(base[1:]) is None  # 2 bytes in: not 16-byte aligned, so Triton's own launch takes it
    assert key(base.float()) != key(base)
    assert entry.key(0, (base, base, base, 64, 64, 64), meta)[1] == [base.data_ptr()] * 3
    assert key(base, width=1) != key(base, width=16) != key(base, width=17)
    assert key(base, block=512) != key(base) and entry.key(1, (base, base, base, 64, 64, 64), meta)[0] != key(base)


def test_kernels_must_take_runtime_arguments_before_constexprs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a JITFunction (read at decoration)

    def constexpr_first(x_ptr, BLOCK: tl.constexpr, n):
        pass

    kernel = triton.jit(constexpr_first)
    if not hasattr(kernel, "params"):
        pytest.skip("this Triton builds interpreted kernels regardless")
    with pytest.raises(ValueError, match="runtime arguments first"):
        launch._Kernel(kernel, (torch.zeros(1), 1))


@needs_triton
def test_launch_computes_what_the_reference_computes():
    gate, up = (torch.randn(3, 700, device=DEVICE) for _ in range(2))
    for _ in range(3):  # on a GPU: the first launch through Triton, then direct
        torch.testing.assert_close(ops.silu_and_mul(gate, up), reference.silu_and_mul(gate, up))
    entry = launch._kernels[triton_layers._silu_and_mul_kernel]
    assert entry.direct == HAS_CUDA and (len(entry.compiled) > 0) == HAS_CUDA


@gpu
def test_a_misaligned_view_takes_tritons_launch_and_gets_the_right_answer():
    entry = launch._kernels.get(triton_layers._silu_and_mul_kernel)
    before = len(entry.compiled) if entry else 0
    flat = torch.randn(2 * 4000 + 1, device=DEVICE, dtype=torch.float16)
    for offset in (0, 1, 0, 1):  # 1 element in: a 2-byte aligned pointer
        gate = flat[offset : offset + 4000].view(4, 1000)
        up = flat[offset + 4000 : offset + 8000].view(4, 1000)
        torch.testing.assert_close(ops.silu_and_mul(gate, up), reference.silu_and_mul(gate, up))
    assert len(launch._kernels[triton_layers._silu_and_mul_kernel].compiled) == before + 1  # the aligned one only


@gpu
def test_direct_decode_attention_equals_tritons_own_launch():
    heads, kv_heads, dim, block = 8, 2, 64, 16
    pool = torch.randn(64, block, kv_heads, dim, device=DEVICE, dtype=torch.bfloat16)
    tables = torch.randperm(64, device=DEVICE, dtype=torch.int32).view(2, 32)
    lens = torch.tensor([500, 17], device=DEVICE, dtype=torch.int32)
    q = torch.randn(2, heads, dim, device=DEVICE, dtype=torch.bfloat16)
    outs = [ops.paged_decode_attention(q, pool, pool, tables, lens) for _ in range(3)]
    assert len(launch._kernels[triton_attention._attention_kernel].compiled) >= 1
    for entry in launch._kernels.values():
        entry.direct = False
    try:
        plain = ops.paged_decode_attention(q, pool, pool, tables, lens)
    finally:
        for entry in launch._kernels.values():
            entry.direct = True
    assert all(torch.equal(out, plain) for out in outs)
