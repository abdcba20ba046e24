"""Triton kernels of ``minipaged.ops`` against their PyTorch references.

On a CPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
Triton is first imported, so this module sets it at the top when no GPU is present (or run
``TRITON_INTERPRET=1 pytest tests/test_ops.py``). If another module imported Triton first
without it, the interpreter tests skip with a message. On a GPU the same tests run compiled
kernels, and the ``gpu`` tests run too.

Tolerances of attention (relative L2 error against a float64 reference on the same inputs):
float32 1e-5, float16 3e-3 and bfloat16 1.5e-2; they cover the output's final rounding (2**-11,
2**-8). The decoder layer's fused kernels round where their references round, so they are held
to the reference in the same dtype: see ``assert_matches_reference``.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import minipaged.ops as ops  # noqa: E402
from minipaged.ops import checks, reference, triton_attention, triton_layers  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
WORKSPACE_DEVICE = torch.empty(0, device=DEVICE).device  # with its index (cuda:0), as tensors name it
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_RUNS = HAS_CUDA or (INTERPRETING and type(triton_attention._attention_kernel).__name__ == "InterpretedFunction")
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS, reason="Triton needs a GPU or TRITON_INTERPRET=1 set before Triton is first imported"
)


def gpu(test):
    """The project's ``gpu`` marker, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output has NaN: some element was not written"
    out, ref = out.cpu().double(), ref.cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


def random_paged(
    num_seqs: int,
    max_len: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    num_blocks: int | None = None,
):
    """Caches, block tables whose entries repeat across sequences, lengths with one at max."""
    width = triton.cdiv(max_len, block_size)
    num_blocks = num_blocks or max(2, width * num_seqs // 2)  # fewer blocks than entries: repeats
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    tables = torch.randint(0, num_blocks, (num_seqs, width), generator=generator, dtype=torch.int32)
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=generator, dtype=torch.int32)
    lens[0] = max_len
    return k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE), lens.to(DEVICE)


def decode_reference(q, k_cache, v_cache, tables, lens):
    return reference.paged_decode_attention(
        q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), tables.cpu(), lens.cpu()
    )


# (query heads, kv heads, head_dim, block_size, dtype): every value of each axis appears;
# 9 over 3 is SmolLM2-135M, 8 over 2 a Llama-style GQA, 4 over 1 MQA, 4 over 4 MHA.
DECODE_CASES = [
    (4, 4, 64, 16, torch.float32),
    (9, 3, 64, 8, torch.float16),
    (8, 2, 128, 32, torch.bfloat16),
    (4, 1, 80, 1, torch.float16),
    (8, 2, 256, 16, torch.float32),
    (6, 2, 96, 256, torch.bfloat16),
    (9, 3, 128, 1, torch.float32),
    (4, 1, 64, 256, torch.float16),
    (8, 8, 80, 32, torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "dtype"), DECODE_CASES)
@pytest.mark.parametrize("partition_size", [None, 4])  # 4: many partitions for the merge pass
def test_paged_decode_matches_reference(heads, kv_heads, head_dim, block_size, dtype, partition_size):
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim + block_size)
    k_cache, v_cache, tables, lens = random_paged(3, 70, kv_heads, head_dim, block_size, dtype, gen)
    q = torch.randn(3, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    triton_attention.attention(
        q,
        k_cache,
        v_cache,
        block_tables=tables,
        starts=None,
        context_lens=lens,
        query_start_loc=None,
        max_context_len=70,
        scale=head_dim**-0.5,
        partition_size=partition_size,
        out=out,
    )
    assert rel_error(out, decode_reference(q, k_cache, v_cache, tables, lens)) < TOLERANCE[dtype]


@needs_triton
def test_public_decode_splits_a_long_sequence(caplog):
    """Batch 1: the heuristic cuts the context into partitions, merged in the same launch."""
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, tables, lens = random_paged(1, 200, 1, 64, 16, torch.float32, gen)
    q = torch.randn(1, 4, 64, generator=gen).to(DEVICE)
    assert triton_attention.choose_partition_size(1, 1, 200, DEVICE, 64) < 200 or HAS_CUDA
    with caplog.at_level(logging.DEBUG, logger="minipaged.ops"):
        out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert "paged_decode_attention: triton" in caplog.text
    assert rel_error(out, decode_reference(q, k_cache, v_cache, tables, lens)) < 1e-5


@needs_triton
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "dtype"), [(4, 2, 64, torch.float32), (9, 3, 80, torch.bfloat16)]
)
def test_contiguous_decode_matches_reference(heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(2)
    lens = torch.tensor([50, 3, 77], dtype=torch.int32)
    starts = torch.tensor([100, 0, 10], dtype=torch.int32)  # slabs anywhere, with gaps
    k_arena = torch.randn(200, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_arena = torch.randn(200, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(3, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = ops.contiguous_decode_attention(q, k_arena, v_arena, starts.to(DEVICE), lens.to(DEVICE))
    ref = reference.contiguous_decode_attention(
        q.cpu().double(), k_arena.cpu().double(), v_arena.cpu().double(), starts, lens
    )
    assert rel_error(out, ref) < TOLERANCE[dtype]


@needs_triton
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "dtype"),
    [
        (4, 2, 64, 16, torch.float32),
        (9, 3, 64, 8, torch.float16),
        (8, 2, 128, 1, torch.bfloat16),
        (4, 1, 80, 32, torch.float32),
    ],
)
def test_paged_prefill_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    """Full prompts, prompts after a cached prefix, a chunk, a single token and an idle sequence."""
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, tables, _ = random_paged(5, 60, kv_heads, head_dim, block_size, dtype, gen)
    lens = torch.tensor([60, 37, 25, 9, 14], dtype=torch.int32)
    num_new = torch.tensor([60, 20, 7, 1, 0])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), num_new.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(num_new.sum()), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = ops.paged_prefill_attention(q, k_cache, v_cache, tables, lens.to(DEVICE), query_start_loc.to(DEVICE))
    ref = reference.paged_prefill_attention(
        q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), tables.cpu(), lens, query_start_loc
    )
    assert rel_error(out, ref) < TOLERANCE[dtype]
    poisoned = torch.full_like(q, float("nan"))  # the kernel itself must write every row
    triton_attention.attention(
        q, k_cache, v_cache, block_tables=tables, starts=None, context_lens=lens.to(DEVICE),
        query_start_loc=query_start_loc.to(DEVICE), max_context_len=60, max_query_len=60,
        scale=head_dim**-0.5, out=poisoned,
    )  # fmt: skip
    assert rel_error(poisoned, ref) < TOLERANCE[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_over_many_tiles_matches_reference(dtype):
    """Contexts of many tiles and prompts of many query blocks, so every program folds in wholly
    visible tiles (no mask) before the ones on its diagonal (masked); lengths are not multiples
    of any tile."""
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables, _ = random_paged(3, 301, 2, 128, 16, dtype, gen)
    lens = torch.tensor([301, 170, 97], dtype=torch.int32)
    num_new = torch.tensor([150, 170, 3])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), num_new.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(num_new.sum()), 8, 128, generator=gen).to(dtype).to(DEVICE)
    out = ops.paged_prefill_attention(q, k_cache, v_cache, tables, lens.to(DEVICE), query_start_loc.to(DEVICE))
    ref = reference.paged_prefill_attention(
        q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), tables.cpu(), lens, query_start_loc
    )
    assert rel_error(out, ref) < TOLERANCE[dtype]


@gpu
def test_long_prompts_take_the_large_prefill_tiles_and_match_reference():
    """Prompts of 2K+ new tokens launch with 128-row, 128-key tiles (``_prefill_config``)."""
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, tables, _ = random_paged(2, 2600, 8, 128, 16, torch.bfloat16, gen)
    lens = torch.tensor([2600, 2100], dtype=torch.int32)
    num_new = torch.tensor([2500, 2100])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), num_new.cumsum(0)]).to(torch.int32)
    assert triton_attention._prefill_config(128, False, DEVICE, 2500)["BLOCK_M"] == 128
    q = torch.randn(int(num_new.sum()), 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    out = ops.paged_prefill_attention(q, k_cache, v_cache, tables, lens.to(DEVICE), query_start_loc.to(DEVICE))
    ref = reference.paged_prefill_attention(
        q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), tables.cpu(), lens, query_start_loc
    )
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@needs_triton
@pytest.mark.parametrize(("pad_seqs", "pad_tokens"), [(0, 0), (0, 21), (3, 21), (3, 0)])
def test_prefill_padded_like_a_cuda_graph_matches_reference(pad_seqs, pad_tokens):
    """A CUDA graph of a prefill step is captured for more tokens and sequences than a replay
    brings (``engine.model_runner``): the extra sequences have no new tokens and the extra
    tokens belong to no sequence. The launch grid has room for all of them
    (``_find_sequence``), and every real row must still be exactly the unpadded result."""
    gen = torch.Generator().manual_seed(15)
    k_cache, v_cache, tables, _ = random_paged(4 + pad_seqs, 70, 2, 64, 16, torch.float32, gen)
    num_new = torch.tensor([70, 1, 17, 33, *[0] * pad_seqs])
    lens = torch.tensor([70, 40, 17, 50, *[1] * pad_seqs], dtype=torch.int32)
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), num_new.cumsum(0)]).to(torch.int32)
    real = int(num_new.sum())
    q = torch.randn(real + pad_tokens, 4, 64, generator=gen).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    triton_attention.attention(
        q, k_cache, v_cache, block_tables=tables, context_lens=lens.to(DEVICE),
        query_start_loc=query_start_loc.to(DEVICE), max_context_len=70, max_query_len=70,
        scale=0.125, out=out,
    )  # fmt: skip
    ref = reference.paged_prefill_attention(
        q[:real].cpu().double(), k_cache.cpu().double(), v_cache.cpu().double(), tables.cpu()[:4], lens[:4],
        query_start_loc[:5], scale=0.125,
    )  # fmt: skip
    assert rel_error(out[:real], ref) < TOLERANCE[torch.float32]
    assert out[real:].isnan().all()  # rows of no sequence are left alone


@needs_triton
def test_prefill_of_one_token_equals_decode():
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, tables, lens = random_paged(3, 40, 2, 64, 8, torch.float32, gen)
    q = torch.randn(3, 4, 64, generator=gen).to(DEVICE)
    query_start_loc = torch.arange(4, dtype=torch.int32, device=DEVICE)
    prefill = ops.paged_prefill_attention(q, k_cache, v_cache, tables, lens, query_start_loc)
    decode = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert rel_error(prefill, decode.double()) < 1e-6


def step_metadata(lens: torch.Tensor, num_new: list[int], block_tables=None, starts=None) -> ops.AttentionMetadata:
    """What a cache would hand ``ops.attention`` for one step (the slots are not read by attention)."""
    decode = num_new == [1] * len(num_new)
    query_start_loc = torch.tensor([0, *num_new], dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    return ops.AttentionMetadata(
        slot_mapping=torch.zeros(sum(num_new), dtype=torch.int64, device=DEVICE),
        context_lens=lens,
        query_start_loc=None if decode else query_start_loc,
        block_tables=block_tables,
        starts=starts,
        max_context_len=int(lens.max()),
        max_query_len=max(num_new),
    )


@needs_triton
@pytest.mark.parametrize("num_new", [[1, 1, 1], [3, 1, 5]], ids=["decode", "prefill"])
def test_attention_over_metadata_matches_its_reference(num_new):
    """``ops.attention`` runs the kernel for both caches, and matches its reference, which reads the
    contiguous arena as a pool of one-slot blocks: exactly the slab reference's result in decode."""
    gen = torch.Generator().manual_seed(14)
    k, v, tables, lens = random_paged(3, 40, 2, 64, 8, torch.float32, gen, num_blocks=24)
    arena_k, arena_v = k.flatten(0, 1), v.flatten(0, 1)
    starts = torch.tensor([0, 60, 120], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(num_new), 4, 64, generator=gen).to(DEVICE)
    paged = step_metadata(lens, num_new, block_tables=tables)
    contiguous = step_metadata(lens, num_new, starts=starts)
    for caches, metadata in [((k, v), paged), ((arena_k, arena_v), contiguous)]:
        want = reference.attention(q.double(), *(c.double() for c in caches), metadata, scale=0.3)
        assert rel_error(ops.attention(q, *caches, metadata, scale=0.3), want) < 1e-5
    if contiguous.is_decode:  # the arena read as one-slot blocks is exactly the slab reference
        spec = reference.attention(q, arena_k, arena_v, contiguous, scale=0.3)
        assert torch.equal(spec, reference.contiguous_decode_attention(q, arena_k, arena_v, starts, lens, scale=0.3))


@needs_triton
@pytest.mark.parametrize("num_new", [[1, 1, 1], [3, 1, 5]], ids=["decode", "prefill"])
def test_attention_reads_q_as_a_view_of_one_qkv_product(num_new):
    """The model hands attention q as a view of its stacked QKV product (tokens strided by
    (H + 2 H_kv) D): the result is the contiguous q's, bit for bit, in a new contiguous tensor."""
    gen = torch.Generator().manual_seed(18)
    k, v, tables, lens = random_paged(3, 40, 2, 64, 8, torch.float32, gen, num_blocks=24)
    qkv = torch.randn(sum(num_new), 4 + 2 + 2, 64, generator=gen).to(DEVICE)
    q = qkv[:, :4]
    metadata = step_metadata(lens, num_new, block_tables=tables)
    out = ops.attention(q, k, v, metadata, scale=0.3)
    assert out.is_contiguous()
    assert torch.equal(out, ops.attention(q.contiguous(), k, v, metadata, scale=0.3))


@needs_triton
def test_offsets_beyond_int32():
    """A pool whose element offsets pass 2**31; only the blocks in use are ever touched."""
    block_size, head_dim = 16, 64
    num_blocks = 2**31 // (block_size * head_dim) + 64  # 4.3 GB of float16, not resident until written
    pool = torch.empty(num_blocks, block_size, 1, head_dim, dtype=torch.float16, device=DEVICE)
    # Sequence 1 shares its first block with sequence 0's last (as after a fork or a prefix hit).
    tables = torch.tensor(
        [[num_blocks - 1, 7, num_blocks - 40], [num_blocks - 40, num_blocks - 2, 0]], dtype=torch.int32, device=DEVICE
    )
    lens = torch.tensor([48, 32], dtype=torch.int32, device=DEVICE)
    written = torch.cat([tables[0], tables[1, 1:2]]).long()
    slots = (written[:, None] * block_size + torch.arange(block_size, device=DEVICE)).flatten()
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(len(slots), 1, head_dim, generator=gen).to(torch.float16).to(DEVICE)
    ops.write_to_cache(rows, rows, pool, pool, slots)  # K and V share the pool: half the address space
    assert torch.equal(pool.view(-1, 1, head_dim)[slots], rows)
    q = torch.randn(2, 4, head_dim, generator=gen).to(torch.float16).to(DEVICE)
    out = ops.paged_decode_attention(q, pool, pool, tables, lens)
    ref = reference.paged_decode_attention(q.double(), pool, pool, tables, lens)  # gathers, then upcasts
    assert rel_error(out, ref) < TOLERANCE[torch.float16]


@needs_triton
@settings(max_examples=8, deadline=None)
@given(
    group=st.sampled_from([1, 2, 3, 4]),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([64, 80]),
    block_size=st.sampled_from([1, 2, 4, 16, 64]),
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_paged_decode_property(group, kv_heads, head_dim, block_size, lens, seed):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, _ = random_paged(len(lens), max(lens), kv_heads, head_dim, block_size, torch.float32, gen)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), group * kv_heads, head_dim, generator=gen).to(DEVICE)
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens_t)
    assert rel_error(out, decode_reference(q, k_cache, v_cache, tables, lens_t)) < 1e-5


# --- cache kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_to_cache_matches_reference(block_size, dtype):
    gen = torch.Generator().manual_seed(6)
    shape = (8, block_size, 3, 80)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    key = torch.randn(5, 3, 80, generator=gen).to(dtype).to(DEVICE)
    value = torch.randn(5, 3, 80, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(8 * block_size, generator=gen)[:5]
    slots[2] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_to_cache(key, value, expected_k, expected_v, slots.to(DEVICE))
    ops.write_to_cache(key, value, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_write_to_cache_into_contiguous_arena():
    """The contiguous cache passes its arena viewed as ``[num_slots, 1, H_kv, D]``."""
    arena_k = torch.zeros(20, 2, 64, device=DEVICE)
    arena_v = torch.zeros(20, 2, 64, device=DEVICE)
    key, value = torch.randn(3, 2, 64, device=DEVICE), torch.randn(3, 2, 64, device=DEVICE)
    ops.write_to_cache(key, value, arena_k.unsqueeze(1), arena_v.unsqueeze(1), torch.tensor([19, 4, -1], device=DEVICE))
    assert torch.equal(arena_k[19], key[0]) and torch.equal(arena_v[4], value[1])
    assert arena_k.count_nonzero() == 2 * 2 * 64


def test_copy_blocks_every_layer():
    gen = torch.Generator().manual_seed(7)
    layers = [torch.randn(6, 4, 2, 64, generator=gen).to(DEVICE) for _ in range(4)]
    k_caches, v_caches = layers[:2], layers[2:]
    expected = [cache.clone() for cache in layers]
    mapping = torch.tensor([[0, 3], [2, 5], [0, 4]], dtype=torch.int64)
    reference.copy_blocks(expected[:2], expected[2:], mapping)
    ops.copy_blocks(k_caches, v_caches, mapping.to(DEVICE))
    for got, want in zip(layers, expected, strict=True):
        assert torch.equal(got, want)


def test_swap_blocks_round_trip():
    gen = torch.Generator().manual_seed(8)
    gpu_side = torch.randn(6, 4, 2, 64, generator=gen).to(DEVICE)
    cpu_side = torch.zeros(5, 4, 2, 64, pin_memory=HAS_CUDA)
    ops.swap_blocks(gpu_side, cpu_side, torch.tensor([[4, 0], [1, 3]]))
    assert torch.equal(cpu_side[0], gpu_side[4].cpu()) and torch.equal(cpu_side[3], gpu_side[1].cpu())
    back = torch.zeros_like(gpu_side)
    ops.swap_blocks(cpu_side, back, torch.tensor([[0, 2], [3, 5]]))
    torch.cuda.synchronize() if HAS_CUDA else None
    assert torch.equal(back[2], gpu_side[4]) and torch.equal(back[5], gpu_side[1])
    ops.swap_blocks(cpu_side, back, torch.zeros(0, 2, dtype=torch.int64))  # nothing to move


# --- the decoder layer's fused kernels --------------------------------------------------------

MANTISSA_BITS = {torch.float16: 11, torch.bfloat16: 8}
# A float32 step that differs from PyTorch's (summation order, rsqrt, exp) can tip one rounding
# to the dtype the other way: one ulp there, two at the output when a rounding follows (rms_norm's
# weight, silu's product). Triton 3.9's interpreter also truncates float32 to bfloat16 instead of
# rounding to nearest, one more ulp per rounding: bfloat16 on a CPU is only held to 4 ulps.
MAX_ULPS = {torch.float16: 2, torch.bfloat16: 4 if INTERPRETING else 2}


def ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|out - ref|`` in units in the last place of ``ref`` (in ``ref``'s half dtype)."""
    _, exponent = torch.frexp(ref.float())  # |ref| in [2**(e-1), 2**e): ulp = 2**(e - mantissa bits)
    finfo = torch.finfo(ref.dtype)
    ulp = torch.ldexp(torch.ones_like(ref, dtype=torch.float64), exponent - MANTISSA_BITS[ref.dtype])
    return (out.double() - ref.double()).abs() / ulp.clamp_min(finfo.smallest_normal * finfo.eps)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, max_ulps: int | None = None) -> None:
    """float32: relative L2 error below 1e-5. float16 and bfloat16: every element within
    ``MAX_ULPS`` (``max_ulps`` when given) and 99% of them bit-identical, which pins where the
    kernel rounds (one rounding too many or too few changes about half of the elements)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out, ref = out.cpu(), ref.cpu()
    if ref.dtype == torch.float32:
        assert rel_error(out, ref) < 1e-5
        return
    assert ulps(out, ref).max() <= (MAX_ULPS[ref.dtype] if max_ulps is None else max_ulps)
    if not (INTERPRETING and ref.dtype == torch.bfloat16):
        assert (out == ref).float().mean() >= 0.99


LAYER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 2048])  # 576: SmolLM2's, not a power of two
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_rms_norm_matches_reference(num_tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(num_tokens * hidden)
    x = (3 * torch.randn(num_tokens, hidden, generator=gen)).to(dtype).to(DEVICE)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    assert_matches_reference(triton_layers.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))


@needs_triton
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (7, 576), (33, 2048)])
def test_rms_norm_with_residual_returns_the_norm_of_the_sum_and_the_sum(num_tokens, hidden, dtype):
    """vLLM's fused add + norm: the sum is rounded to the dtype, as ``x + residual`` in PyTorch;
    the inputs are left as they were."""
    gen = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(2, num_tokens, hidden, generator=gen) * 3).to(dtype).to(DEVICE)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    inputs = (x.clone(), residual.clone())
    out, total = triton_layers.rms_norm(x, weight, 1e-6, residual)
    _, ref_total = reference.rms_norm(x, weight, 1e-6, residual)
    if INTERPRETING and dtype == torch.bfloat16:  # truncated, not rounded (see MAX_ULPS)
        assert ulps(total, ref_total).max() <= 1
    else:
        assert torch.equal(total, ref_total)
    assert_matches_reference(out, reference.rms_norm(total, weight, 1e-6))  # the norm of that very sum
    assert torch.equal(x, inputs[0]) and torch.equal(residual, inputs[1])


def random_rotary_tables(positions: int, head_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of random angles, float32 ``[positions, head_dim // 2]``."""
    angles = 2 * torch.pi * torch.rand(positions, head_dim // 2, generator=gen)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


# (query heads, KV heads, head_dim): MHA, SmolLM2-135M's 9 over 3, Llama-3-8B's 32 over 8, MQA.
ROTARY_HEADS = [(4, 4, 64), (9, 3, 64), (32, 8, 128), (8, 1, 128)]


@needs_triton
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), ROTARY_HEADS)
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_rotary_matches_reference_in_place(num_tokens, heads, kv_heads, head_dim, dtype):
    """One rounding from float32, as the reference: bit-identical but for the interpreter's
    bfloat16 truncation (one ulp)."""
    gen = torch.Generator().manual_seed(num_tokens * heads + head_dim)
    cos, sin = random_rotary_tables(100, head_dim, gen)
    positions = torch.randint(0, 100, (num_tokens,), generator=gen).to(DEVICE)  # any order, repeats
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    ref_q, ref_k = reference.rotary(q.clone(), k.clone(), cos, sin, positions)
    out_q, out_k = triton_layers.rotary(q, k, cos, sin, positions)
    assert out_q is q and out_k is k  # rotated in place
    for out, ref in [(out_q, ref_q), (out_k, ref_k)]:
        assert_matches_reference(out, ref, max_ulps=1)


@needs_triton
def test_rotary_of_q_and_k_sliced_out_of_one_projection():
    """q and k as views of a fused QKV projection's rows: strided tokens, contiguous heads."""
    gen = torch.Generator().manual_seed(16)
    cos, sin = random_rotary_tables(20, 64, gen)
    qkv = torch.randn(5, (4 + 2 + 2) * 64, generator=gen).to(DEVICE)
    q, k = qkv[:, : 4 * 64].view(5, 4, 64), qkv[:, 4 * 64 : 6 * 64].view(5, 2, 64)
    positions = torch.tensor([0, 19, 7, 7, 1], device=DEVICE)
    ref_q, ref_k = reference.rotary(q.clone(), k.clone(), cos, sin, positions)
    untouched = qkv[:, 6 * 64 :].clone()
    triton_layers.rotary(q, k, cos, sin, positions)
    assert_matches_reference(q, ref_q)
    assert_matches_reference(k, ref_k)
    assert torch.equal(qkv[:, 6 * 64 :], untouched)  # v, beside them, is not written


@needs_triton
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 80)])  # 80: padded dims
def test_rotary_and_write_is_rotary_then_write_to_cache(heads, kv_heads, head_dim, block_size, dtype):
    """The model's fused write: q turned in place and the turned keys stored exactly as ``rotary``
    then ``write_to_cache`` do (q, k, v strided views of one QKV product; a padding slot -1 stores
    nothing), and the keys themselves left as they were."""
    gen = torch.Generator().manual_seed(heads * block_size + head_dim)
    num_tokens = 6
    cos, sin = random_rotary_tables(50, head_dim, gen)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.view(num_tokens, heads + 2 * kv_heads, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    positions = torch.randint(0, 50, (num_tokens,), generator=gen).to(DEVICE)
    k_cache = torch.randn(8, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(8, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(8 * block_size, generator=gen)[:num_tokens]
    slots[3] = -1
    slots = slots.to(DEVICE)
    want_q, want_k_cache, want_v_cache = q.clone(), k_cache.clone(), v_cache.clone()
    reference.rotary_and_write(want_q, k.clone(), v, cos, sin, positions, want_k_cache, want_v_cache, slots)
    keys = k.clone()
    assert ops.rotary_and_write(q, k, v, cos, sin, positions, k_cache, v_cache, slots) is q
    assert_matches_reference(q, want_q, max_ulps=1)
    assert_matches_reference(k_cache, want_k_cache, max_ulps=1)
    assert torch.equal(v_cache, want_v_cache) and torch.equal(k, keys)


@needs_triton
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (3, 50), (4, 8192), (2, 20000)])
def test_greedy_sample_matches_reference(rows, vocab, dtype):
    """Same tokens as argmax, ties to the lowest index (within a chunk of the kernel's loop and
    across chunks), and log-probabilities within float32 rounding; rows may be strided."""
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = (3 * torch.randn(rows, 2 * vocab, generator=gen)).to(dtype)[:, :vocab]  # rows strided
    if vocab > 8192:  # the kernel reads 8192 logits at a time
        logits[0, [9000, 17000]] = 20.0  # equal maxima in the second and third chunk: 9000
        logits[1, [8200, 8201, 10]] = 20.0  # and in the first and second: 10
        logits[0, :8192] = float("-inf")  # a whole chunk of -inf first: nothing to shift by yet
    logits = logits.to(DEVICE)
    tokens, logprobs = ops.greedy_sample(logits)
    want_tokens, want_logprobs = reference.greedy_sample(logits)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert tokens.tolist() == want_tokens.tolist()
    if vocab > 8192:
        assert tokens.tolist() == [9000, 10]
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)


@needs_triton
def test_greedy_sample_of_a_row_of_only_minus_infinity_is_token_0_with_no_log_probability():
    logits = torch.full((2, 300), float("-inf"), device=DEVICE)
    logits[1, 7] = 0.0
    tokens, logprobs = ops.greedy_sample(logits)
    assert tokens.tolist() == reference.greedy_sample(logits)[0].tolist() == [0, 7]
    assert logprobs[0].isnan() and logprobs[1] == 0.0


@needs_triton
@pytest.mark.parametrize("dtype", LAYER_DTYPES)
@pytest.mark.parametrize("intermediate", [96, 1536, 8192])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_silu_and_mul_matches_reference(num_tokens, intermediate, dtype):
    gen = torch.Generator().manual_seed(num_tokens + intermediate)
    gate = (4 * torch.randn(num_tokens, intermediate, generator=gen)).to(dtype).to(DEVICE)  # silu's bend and tails
    up = torch.randn(num_tokens, intermediate, generator=gen).to(dtype).to(DEVICE)
    assert_matches_reference(triton_layers.silu_and_mul(gate, up), reference.silu_and_mul(gate, up))


@needs_triton
def test_silu_and_mul_of_the_two_halves_of_one_gate_up_product():
    """gate and up as views of the model's stacked gate/up product: rows strided by 2I."""
    gen = torch.Generator().manual_seed(19)
    gate_up = (4 * torch.randn(7, 2 * 96, generator=gen)).to(DEVICE)
    gate, up = gate_up.split(96, dim=1)
    out = triton_layers.silu_and_mul(gate, up)
    assert out.is_contiguous()
    assert_matches_reference(out, reference.silu_and_mul(gate.contiguous(), up.contiguous()))


def test_layer_ops_run_the_reference_where_the_kernels_do_not_cover_the_call(caplog):
    """float64 (the kernels compute in float32), a row wider than one block, a strided head dimension."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(3, 64, generator=gen, dtype=torch.float64).to(DEVICE)
    wide = torch.randn(2, 70000, generator=gen).to(DEVICE)
    q = torch.randn(3, 16, 2, generator=gen).to(DEVICE).transpose(1, 2)  # [3, 2, 16], head dimension strided
    cos, sin = random_rotary_tables(8, 16, gen)
    positions = torch.tensor([0, 5, 2], device=DEVICE)
    with caplog.at_level(logging.DEBUG, logger="minipaged.ops"):
        assert torch.equal(ops.rms_norm(x, x[0], 1e-5), reference.rms_norm(x, x[0], 1e-5))
        assert torch.equal(ops.silu_and_mul(x, x), reference.silu_and_mul(x, x))
        assert torch.equal(ops.rms_norm(wide, wide[0], 1e-5), reference.rms_norm(wide, wide[0], 1e-5))
        want = reference.rotary(q.clone(), q.clone(), cos, sin, positions)
        assert all(map(torch.equal, ops.rotary(q, q.clone(), cos, sin, positions), want))
        columns = torch.randn(50, 3, generator=gen).to(DEVICE).t()  # [3, 50], vocabulary strided
        assert all(map(torch.equal, ops.greedy_sample(columns), reference.greedy_sample(columns)))
        cache = torch.zeros(4, 2, 2, 16, dtype=torch.float64, device=DEVICE)
        rows = torch.randn(3, 2, 16, generator=gen, dtype=torch.float64).to(DEVICE)
        ops.rotary_and_write(x.view(3, 4, 16), rows, rows, cos, sin, positions, cache, cache.clone(), positions)
        assert torch.equal(cache.view(8, 2, 16)[positions], reference.rotary(rows.clone(), rows.clone(), cos, sin,
                                                                             positions)[1])
    for op, why in [("rms_norm", "float64 (the kernels compute in float32)"), ("silu_and_mul", "float64"),
                    ("rms_norm", "hidden size above 65536"), ("rotary", "head dimension not contiguous"),
                    ("greedy_sample", "vocabulary dimension not contiguous"),
                    ("rotary_and_write", "float64")]:  # fmt: skip
        assert f"{op}: reference ({why}" in caplog.text


def _layer_op_args():
    hidden, heads, head_dim = 32, 4, 16
    return {
        "rms_norm": dict(x=torch.randn(3, hidden), weight=torch.ones(hidden), eps=1e-5,
                         residual=torch.randn(3, hidden)),
        "rotary": dict(q=torch.randn(3, heads, head_dim), k=torch.randn(3, 2, head_dim), cos=torch.ones(10, 8),
                       sin=torch.zeros(10, 8), positions=torch.tensor([0, 4, 9])),
        "silu_and_mul": dict(gate=torch.randn(3, 48), up=torch.randn(3, 48)),
        "rotary_and_write": dict(q=torch.randn(3, heads, head_dim), key=torch.randn(3, 2, head_dim),
                                 value=torch.randn(3, 2, head_dim), cos=torch.ones(10, 8), sin=torch.zeros(10, 8),
                                 positions=torch.tensor([0, 4, 9]), k_cache=torch.zeros(4, 2, 2, head_dim),
                                 v_cache=torch.zeros(4, 2, 2, head_dim), slot_mapping=torch.tensor([7, -1, 0])),
        "greedy_sample": dict(logits=torch.randn(3, 40)),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("op", "name", "bad"),
    [
        ("rms_norm", "x", torch.randn(3, 4, 32)),
        ("rms_norm", "x", torch.zeros(3, 32, dtype=torch.int32)),
        ("rms_norm", "weight", torch.ones(31)),
        ("rms_norm", "weight", torch.ones(32, dtype=torch.float16)),  # not x's dtype
        ("rms_norm", "weight", torch.ones(32, device="meta")),
        ("rms_norm", "eps", -1.0),
        ("rms_norm", "residual", torch.randn(4, 32)),
        ("rms_norm", "residual", torch.randn(3, 32, dtype=torch.bfloat16)),
        ("rotary", "q", torch.randn(3, 4, 15)),  # odd head_dim: no pairs
        ("rotary", "k", torch.randn(3, 2, 32)),
        ("rotary", "k", torch.randn(2, 2, 16)),  # not q's tokens
        ("rotary", "cos", torch.ones(10, 16)),  # head_dim columns, not head_dim / 2
        ("rotary", "cos", torch.ones(10, 8, dtype=torch.bfloat16)),  # the tables are float32
        ("rotary", "sin", torch.zeros(9, 8)),
        ("rotary", "positions", torch.tensor([0, 1])),
        ("rotary", "positions", torch.tensor([0.0, 1.0, 2.0])),
        ("rotary", "positions", torch.tensor([0, 10, 2])),  # past the tables (checked on the host)
        ("silu_and_mul", "gate", torch.randn(48)),
        ("silu_and_mul", "up", torch.randn(3, 47)),
        ("silu_and_mul", "up", torch.randn(3, 48, dtype=torch.float16)),
        ("rotary_and_write", "key", torch.randn(3, 2, 8)),  # not q's head_dim
        ("rotary_and_write", "value", torch.randn(3, 1, 16)),
        ("rotary_and_write", "v_cache", torch.zeros(4, 2, 1, 16)),  # not k_cache's shape
        ("rotary_and_write", "slot_mapping", torch.tensor([7, -1])),
        ("rotary_and_write", "slot_mapping", torch.tensor([7, -1, 8])),  # past the cache's 8 slots
        ("rotary_and_write", "positions", torch.tensor([0, 10, 2])),
        ("greedy_sample", "logits", torch.randn(3, 0)),  # no vocabulary
        ("greedy_sample", "logits", torch.randint(0, 9, (3, 40))),
    ],
)
def test_bad_layer_op_arguments_name_the_argument(op, name, bad):
    args = _layer_op_args()[op]
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}: "):
        getattr(ops, op)(**args)


# --- argument checks and fallback ------------------------------------------------------------


def _decode_args():
    k_cache = torch.randn(4, 16, 2, 64)
    return dict(
        q=torch.randn(2, 4, 64),
        k_cache=k_cache,
        v_cache=k_cache.clone(),
        block_tables=torch.zeros(2, 2, dtype=torch.int32),
        context_lens=torch.tensor([5, 7], dtype=torch.int32),
    )


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("q", torch.randn(2, 4)),
        ("q", torch.randn(2, 3, 64)),  # 3 query heads over 2 KV heads
        ("q", torch.randn(2, 4, 64, dtype=torch.float16)),  # dtype differs from the cache: named on k_cache
        ("k_cache", torch.randn(4, 16, 2, 32)),
        ("k_cache", torch.randn(4, 12, 2, 64)),  # block size not a power of two
        ("v_cache", torch.randn(4, 16, 2, 64, dtype=torch.float16)),
        ("v_cache", torch.randn(4, 16, 2, 64, device="meta")),
        ("block_tables", torch.zeros(2, 2)),
        ("block_tables", torch.zeros(3, 2, dtype=torch.int32)),
        ("context_lens", torch.tensor([5], dtype=torch.int32)),
        ("context_lens", torch.tensor([5, 0], dtype=torch.int32)),
        ("context_lens", torch.tensor([5, 33], dtype=torch.int32)),
    ],
)
def test_bad_decode_arguments_name_the_argument(name, bad):
    args = _decode_args()
    args[name] = bad
    if name == "k_cache":  # a bad pair, so that the mismatch is not blamed on v_cache
        args["v_cache"] = bad.clone()
    with pytest.raises(ValueError, match=r"^(q|k_cache|v_cache|block_tables|context_lens)") as error:
        ops.paged_decode_attention(**args)
    expected = "k_cache" if name == "q" and bad.dtype == torch.float16 else name
    assert str(error.value).startswith(expected)


def test_bad_cache_op_arguments_name_the_argument():
    cache = torch.zeros(4, 16, 2, 64)
    with pytest.raises(ValueError, match="^slot_mapping"):
        ops.write_to_cache(
            torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), cache, cache, torch.zeros(2, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="^key"):
        ops.write_to_cache(
            torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), cache, cache, torch.zeros(3, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="^block_mapping"):
        ops.copy_blocks([cache], [cache], torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="^dst"):
        ops.swap_blocks(cache, torch.zeros(4, 8, 2, 64), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="^query_start_loc"):
        ops.paged_prefill_attention(
            torch.zeros(3, 4, 64),
            cache,
            cache,
            torch.zeros(2, 2, dtype=torch.int32),
            torch.tensor([5, 7], dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="^max_context_len"):
        ops.paged_decode_attention(torch.zeros(1, 4, 64), cache, cache, torch.zeros(1, 2, dtype=torch.int32),
                                   torch.tensor([20], dtype=torch.int32), max_context_len=16)  # fmt: skip
    with pytest.raises(ValueError, match="^starts"):
        ops.contiguous_decode_attention(
            torch.zeros(1, 4, 64), cache[0], cache[0], torch.tensor([10]), torch.tensor([7])
        )


def test_fallback_to_reference_is_logged(monkeypatch, caplog):
    """On a CPU without the interpreter, and for float64 anywhere, the reference runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _decode_args()
    with caplog.at_level(logging.DEBUG, logger="minipaged.ops"):
        out = ops.paged_decode_attention(**args)
        expected = reference.paged_decode_attention(**args)
        ops.write_to_cache(
            torch.randn(1, 2, 64), torch.randn(1, 2, 64), args["k_cache"], args["v_cache"], torch.tensor([3])
        )
    assert "paged_decode_attention: reference (cpu tensors without TRITON_INTERPRET=1)" in caplog.text
    assert "write_to_cache: reference" in caplog.text
    assert torch.equal(out, expected)
    caplog.clear()
    monkeypatch.undo()
    double = {k: (v.double() if v.is_floating_point() else v) for k, v in _decode_args().items()}
    with caplog.at_level(logging.DEBUG, logger="minipaged.ops"):
        ops.paged_decode_attention(**double)
    assert "reference (float64" in caplog.text


def test_every_op_logs_the_one_backend_choice(monkeypatch, caplog):
    """Each public op goes through the same choice, and says which backend ran and why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _decode_args()
    k, v = args["k_cache"], args["v_cache"]
    lens = args["context_lens"]
    with caplog.at_level(logging.DEBUG, logger="minipaged.ops"):
        ops.paged_decode_attention(**args)
        ops.contiguous_decode_attention(args["q"], k[0], v[0], torch.tensor([0, 8]), torch.tensor([5, 7]))
        ops.paged_prefill_attention(args["q"], k, v, args["block_tables"], lens, torch.tensor([0, 1, 2]))
        ops.attention(args["q"], k, v, step_metadata(lens, [1, 1], block_tables=args["block_tables"]))
        ops.write_to_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), k, v, torch.tensor([3]))
        ops.copy_blocks([k], [v], torch.tensor([[0, 1]]))
        ops.swap_blocks(k, torch.zeros_like(k), torch.tensor([[0, 1]]))
        for op, layer_args in _layer_op_args().items():
            getattr(ops, op)(**layer_args)
    why = "reference (cpu tensors without TRITON_INTERPRET=1)"
    for op in ("paged_decode_attention", "contiguous_decode_attention", "paged_prefill_attention",
               "attention (paged, decode)", "write_to_cache", "copy_blocks", *_layer_op_args()):  # fmt: skip
        assert f"{op}: {why}" in caplog.text
    assert "swap_blocks: torch (gather, one transfer, scatter)" in caplog.text  # one implementation


def test_attention_checks_read_no_index_values():
    """``ops.attention`` checks shapes only: its index tensors may hold no data at all (the meta
    device), so on a GPU the check never waits for the GPU and a CUDA graph can capture it."""
    meta = torch.device("meta")
    metadata = ops.AttentionMetadata(
        slot_mapping=torch.empty(5, dtype=torch.int64, device=meta),
        context_lens=torch.empty(2, dtype=torch.int32, device=meta),
        query_start_loc=torch.empty(3, dtype=torch.int32, device=meta),
        block_tables=torch.empty(2, 3, dtype=torch.int32, device=meta),
        starts=None,
        max_context_len=40,
        max_query_len=4,
    )
    q, k_cache = torch.zeros(5, 4, 64), torch.zeros(4, 16, 2, 64)
    checks.check_attention(q, k_cache, k_cache.clone(), metadata)
    with pytest.raises(ValueError, match="^q: has 4 tokens, metadata.slot_mapping 5"):
        checks.check_attention(q[:4], k_cache, k_cache.clone(), metadata)


# --- GPU only ----------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 128])
def test_gpu_llama_shapes_long_context(dtype, block_size):
    """Llama-3-8B heads, thousands of blocks in the pool, lengths up to 5000."""
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache, tables, lens = random_paged(6, 5000, 8, 128, block_size, dtype, gen, num_blocks=4096)
    q = torch.randn(6, 32, 128, generator=gen).to(dtype).to(DEVICE)
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert rel_error(out, decode_reference(q, k_cache, v_cache, tables, lens)) < TOLERANCE[dtype]


@pytest.mark.parametrize("case", ["head_dim_8", "strided_cache", "empty_batch"])
def test_unsupported_cases_run_the_reference(case, caplog):
    gen = torch.Generator().manual_seed(10)
    head_dim = 8 if case == "head_dim_8" else 64
    k_cache, v_cache, tables, lens = random_paged(2, 20, 2, head_dim, 8, torch.float32, gen)
    if case == "strided_cache":  # every other element of a twice-as-wide cache
        k_cache = torch.stack([k_cache, k_cache], dim=-1).flatten(-2)[..., ::2]
    q = torch.randn(2, 4, head_dim, generator=gen).to(DEVICE)
    if case == "empty_batch":
        q, tables, lens = q[:0], tables[:0], lens[:0]
    with caplog.at_level(logging.DEBUG, logger="minipaged.ops"):
        out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert "paged_decode_attention: reference (" in caplog.text
    assert out.shape == q.shape
    if q.shape[0]:
        assert rel_error(out, decode_reference(q, k_cache, v_cache, tables, lens)) < 1e-6


@gpu
def test_gpu_split_k_is_deterministic():
    """94 partitions per sequence, merged in two levels by racing programs: launches are bit-identical."""
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, tables, lens = random_paged(4, 6000, 8, 128, 16, torch.bfloat16, gen, num_blocks=2048)
    q = torch.randn(4, 32, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    outs = [
        triton_attention.attention(q, k_cache, v_cache, block_tables=tables, starts=None, context_lens=lens,
                                   query_start_loc=None, max_context_len=6000, scale=128**-0.5, partition_size=64)
        for _ in range(50)
    ]  # fmt: skip
    assert all(torch.equal(out, outs[0]) for out in outs)
    assert rel_error(outs[0], decode_reference(q, k_cache, v_cache, tables, lens)) < TOLERANCE[torch.bfloat16]


# -- arguments the kernels must honour: scale, views, guard rows -------------------------------
@needs_triton
def test_scale_is_honoured_by_every_attention_op():
    gen = torch.Generator().manual_seed(11)
    k, v, tables, lens = random_paged(3, 40, 2, 64, 8, torch.float32, gen, num_blocks=24)
    q = torch.randn(3, 4, 64, generator=gen).to(DEVICE)
    out = ops.paged_decode_attention(q, k, v, tables, lens, scale=0.3)
    ref = reference.paged_decode_attention(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens.cpu(), scale=0.3)
    assert rel_error(out, ref) < 1e-5
    arena_k, arena_v = k.flatten(0, 1), v.flatten(0, 1)
    starts = torch.tensor([0, 60, 120], dtype=torch.int32, device=DEVICE)
    out = ops.contiguous_decode_attention(q, arena_k, arena_v, starts, lens, scale=0.3)
    ref = reference.contiguous_decode_attention(
        q.cpu(), arena_k.cpu(), arena_v.cpu(), starts.cpu(), lens.cpu(), scale=0.3
    )
    assert rel_error(out, ref) < 1e-5
    new = torch.tensor([3, 1, 5], dtype=torch.int32)
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int32), new.cumsum(0).int()]).to(DEVICE)
    q_new = torch.randn(int(new.sum()), 4, 64, generator=gen).to(DEVICE)
    out = ops.paged_prefill_attention(q_new, k, v, tables, lens, query_start_loc, scale=0.3)
    ref = reference.paged_prefill_attention(
        q_new.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens.cpu(), query_start_loc.cpu(), scale=0.3
    )
    assert rel_error(out, ref) < 1e-5


@needs_triton
def test_index_tensors_and_q_may_be_views():
    """Column views, strided tables, a q sliced out of a fused QKV projection and a q whose head
    dimension is strided (before the check copied such a q, the kernel read it as contiguous)."""
    gen = torch.Generator().manual_seed(12)
    k, v, tables, lens = random_paged(3, 40, 2, 64, 8, torch.float32, gen, num_blocks=24)
    wide = torch.zeros(3, 2 * tables.shape[1], dtype=torch.int32, device=DEVICE)
    wide[:, ::2] = tables
    lens_view = torch.stack([lens, lens + 7], dim=1)[:, 0]
    qkv = torch.randn(3, 3 * 4 * 64, generator=gen).to(DEVICE)
    q = qkv[:, : 4 * 64].view(3, 4, 64)
    assert not q.is_contiguous() and not lens_view.is_contiguous() and not wide[:, ::2].is_contiguous()
    want = reference.paged_decode_attention(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens.cpu())
    assert rel_error(ops.paged_decode_attention(q, k, v, wide[:, ::2], lens_view), want) < 1e-5
    assert rel_error(ops.paged_decode_attention(q, k, v, tables.t().contiguous().t(), lens), want) < 1e-5
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, head dimension strided
    assert q_strided.stride(-1) == 4
    assert rel_error(ops.paged_decode_attention(q_strided, k, v, tables, lens), want) < 1e-5
    arena_k, arena_v = k.flatten(0, 1), v.flatten(0, 1)
    starts = torch.tensor([[0, 9], [60, 9], [120, 9]], dtype=torch.int32, device=DEVICE)[:, 0]
    out = ops.contiguous_decode_attention(q, arena_k, arena_v, starts, lens_view)
    ref = reference.contiguous_decode_attention(q.cpu(), arena_k.cpu(), arena_v.cpu(), starts.cpu(), lens.cpu())
    assert rel_error(out, ref) < 1e-5
    new = torch.tensor([3, 1, 5], dtype=torch.int32)
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int32), new.cumsum(0).int()]).to(DEVICE)
    q_new = torch.randn(9, 4, 64, generator=gen).to(DEVICE)
    starts_view = torch.stack([query_start_loc] * 2, 1)[:, 0]
    out = ops.paged_prefill_attention(q_new, k, v, wide[:, ::2], lens_view, starts_view)
    ref = reference.paged_prefill_attention(
        q_new.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens.cpu(), query_start_loc.cpu()
    )
    assert rel_error(out, ref) < 1e-5
    key = torch.randn(4, 2, 64, generator=gen).to(DEVICE)
    slots = torch.tensor([[3, 0], [77, 0], [-1, 0], [12, 0]], device=DEVICE)[:, 0]
    got_k, got_v = k.clone(), v.clone()
    ops.write_to_cache(key, -key, got_k, got_v, slots)
    want_k, want_v = k.cpu().clone(), v.cpu().clone()
    reference.write_to_cache(key.cpu(), -key.cpu(), want_k, want_v, slots.cpu().contiguous())
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)


@needs_triton
@pytest.mark.parametrize("decode", [True, False])
def test_no_store_outside_the_output_rows(decode):
    """Rows of the query tile that are padding (group of 3 padded to 4, tokens past a sequence's
    new ones) must never be stored: guard rows around the output stay NaN."""
    gen = torch.Generator().manual_seed(13)
    k, v, tables, lens = random_paged(2, 48, 3, 64, 16, torch.float32, gen)
    num_q = 2 if decode else 7
    buffer = torch.full((num_q + 2, 9, 64), float("nan"), device=DEVICE)
    q = torch.randn(num_q, 9, 64, generator=gen).to(DEVICE)
    query_start_loc = None if decode else torch.tensor([0, 5, 7], dtype=torch.int32, device=DEVICE)
    lens = torch.maximum(lens, torch.tensor(5, dtype=lens.dtype, device=DEVICE))
    triton_attention.attention(
        q, k, v, block_tables=tables, starts=None, context_lens=lens, query_start_loc=query_start_loc,
        max_context_len=48, max_query_len=5, scale=0.125, out=buffer[1:-1], partition_size=16 if decode else None,
    )
    assert buffer[0].isnan().all() and buffer[-1].isnan().all()
    assert not buffer[1:-1].isnan().any()


def test_out_of_range_indices_are_rejected():
    k = torch.zeros(4, 16, 2, 64)
    q = torch.zeros(2, 4, 64)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    good = torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)  # 9 is past sequence 0's length: ignored
    ops.paged_decode_attention(q, k, k.clone(), good, lens)
    with pytest.raises(ValueError, match="^block_tables: entries must be block numbers in"):
        ops.paged_decode_attention(q, k, k.clone(), torch.tensor([[0, 0], [1, 4]], dtype=torch.int32), lens)
    with pytest.raises(ValueError, match="^block_tables: entries must be block numbers in"):
        ops.paged_decode_attention(q, k, k.clone(), torch.tensor([[-1, 0], [1, 2]], dtype=torch.int32), lens)
    with pytest.raises(ValueError, match="^slot_mapping"):
        ops.write_to_cache(torch.zeros(2, 2, 64), torch.zeros(2, 2, 64), k, k.clone(), torch.tensor([3, 64]))
    with pytest.raises(ValueError, match="^block_mapping"):
        ops.copy_blocks([k], [k.clone()], torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="^block_mapping"):
        ops.swap_blocks(k, torch.zeros(2, 16, 2, 64), torch.tensor([[3, 2]]))
    with pytest.raises(ValueError, match="^query_start_loc: must be non-decreasing"):
        ops.paged_prefill_attention(
            torch.zeros(3, 4, 64), k, k.clone(), good, lens, torch.tensor([0, 4, 3], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="^q: needs at least one head"):
        ops.paged_decode_attention(torch.zeros(2, 4, 0), torch.zeros(4, 16, 2, 0), torch.zeros(4, 16, 2, 0), good, lens)
    with pytest.raises(ValueError, match="^max_context_len"):
        ops.paged_decode_attention(q, k, k.clone(), good, lens, max_context_len=0)


# --- host cost: what one call does on the CPU before its launches ---------------------------


@needs_triton
def test_split_k_partials_reuse_one_workspace_that_only_grows():
    """A split-K call allocates no partials of its own: it writes them into the device's cached
    workspace. A larger call grows it and keeps the outgrown buffer alive (a CUDA graph captured
    earlier still writes there); results stay right before and after the growth."""
    gen = torch.Generator().manual_seed(21)
    k_cache, v_cache, tables, lens = random_paged(2, 90, 2, 64, 8, torch.float32, gen)
    q = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
    want = decode_reference(q, k_cache, v_cache, tables, lens)

    def split_call(partition_size):
        return triton_attention.attention(
            q, k_cache, v_cache, block_tables=tables, context_lens=lens, max_context_len=90, scale=64**-0.5,
            partition_size=partition_size,
        )  # fmt: skip

    assert rel_error(split_call(32), want) < 1e-5
    buffer = triton_attention._workspaces[WORKSPACE_DEVICE, torch.float32]
    assert rel_error(split_call(32), want) < 1e-5
    assert triton_attention._workspaces[WORKSPACE_DEVICE, torch.float32] is buffer  # reused, not reallocated
    needed = triton_attention._partials_numel(2, 4, triton.cdiv(90, 4), 64)
    assert rel_error(split_call(4), want) < 1e-5  # 23 partitions: the buffer may have to grow
    grown = triton_attention._workspaces[WORKSPACE_DEVICE, torch.float32]
    assert grown.numel() >= needed
    if grown is not buffer:
        assert any(old is buffer for old in triton_attention._outgrown)
    assert rel_error(split_call(32), want) < 1e-5


@needs_triton
@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 4), (4, 4)])  # a group of 3 (padded to 4), and MHA
def test_split_k_is_merged_in_the_kernel_in_one_or_two_levels(heads, kv_heads):
    """The last partition of each (sequence, KV head) to finish merges them; past ``merge_group``
    partitions the last of each group merges its group and the last group the groups. Every way
    gives the reference's result, on lengths that leave some partitions and groups of some sequences
    empty, and the ticket counters are back at 0 after the call (so the next call, or a CUDA graph's
    next replay, starts clean). Sequences of 1 and 16 tokens fit one partition: their one program
    writes the output, and their partials stay untouched."""
    gen = torch.Generator().manual_seed(23)
    k_cache, v_cache, tables, lens = random_paged(4, 90, kv_heads, 32, 8, torch.float32, gen)
    lens[1], lens[2], lens[3] = 17, 1, 16
    q = torch.randn(4, heads, 32, generator=gen).to(DEVICE)
    want = decode_reference(q, k_cache, v_cache, tables, lens)

    def split_call(partition_size, merge_group):
        return triton_attention.attention(
            q, k_cache, v_cache, block_tables=tables, context_lens=lens, max_context_len=90, scale=32**-0.5,
            partition_size=partition_size, config={"merge_group": merge_group}, out=torch.full_like(q, float("nan")),
        )  # fmt: skip

    split_call(16, 8)  # the workspaces exist from here on
    partials = triton_attention._workspaces[WORKSPACE_DEVICE, torch.float32]
    maxes = partials[: 4 * heads * 6].view(4, heads, 6)  # 6 partitions of 16; the running maxes come first
    # 6 partitions in one group, in groups of 4 and 2 (two levels); 12 of 8 in 3 groups of 4, in 6 of 2.
    for partition_size, merge_group in ((16, 8), (16, 4), (8, 4), (8, 2)):
        partials.fill_(123.0)
        assert rel_error(split_call(partition_size, merge_group), want) < 1e-5, (partition_size, merge_group)
        if partition_size == 16:
            assert (maxes[2:] == 123.0).all()  # 1 and 16 tokens: no partials
            assert (maxes[:2, :, :2] != 123.0).all()  # 90 and 17 tokens: their first two partitions' partials
        assert not triton_attention._workspaces[WORKSPACE_DEVICE, torch.int32].any()  # the counters
    assert rel_error(split_call(16, 4), want) < 1e-5  # and again, from the reset counters


def test_split_k_merges_in_groups_that_one_program_can_hold(monkeypatch):
    """A KV group's partials of up to 16 partitions (4 heads x 128 dims each) fit one program: 16
    partitions are merged in one level, 128 in groups of 8 and then the 16 groups (a counter per
    group and one for the groups). A group of 16 heads holds 4 partitions: groups of 2, so its
    split-K stops at 2 x 4 = 8 partitions."""
    def plan(partitions, num_heads=32, partition_size=256):
        return triton_attention._plan(
            num_seqs=1, num_tokens=1, num_heads=num_heads, head_dim=128, num_kv_heads=8, paged=True, block_size=16,
            dtype=torch.float16, device=torch.device("cpu"), decode=True,
            max_context_len=partitions * 256, max_query_len=1, partition_size=partition_size, config=None,
            varied_lengths=False,
        )  # fmt: skip

    assert (plan(16).meta["MERGE_GROUP"], plan(16).meta["MERGE_GROUPS"], plan(16).counters_numel) == (16, 1, 8 * 2)
    assert (plan(128).meta["MERGE_GROUP"], plan(128).meta["MERGE_GROUPS"]) == (8, 16)
    assert plan(128).counters_numel == 8 * (16 + 1)
    assert plan(3).meta["MERGE_GROUP"] == 4 and plan(1).meta["SPLIT"] is False and plan(1).counters_numel == 0
    monkeypatch.setattr(triton_attention, "_num_multiprocessors", lambda device: 132)  # an H100's count
    try:
        assert plan(512, partition_size=None).num_partitions == 64  # ~4 programs per multiprocessor
        assert plan(512, num_heads=128, partition_size=None).num_partitions == 8
    finally:
        triton_attention._plan.cache_clear()  # forget the plans made for 132 multiprocessors


def test_a_servers_decode_is_cut_into_short_partitions():
    """The engine's plan (``varied_lengths``) cuts a context bound of 2048 into pieces of 128 tokens
    with 8 KB tiles and merges them in the kernel; a direct call keeps the batch-filling plan. (On
    the CPU device the plan counts 2 "multiprocessors", so these are not a GPU's numbers.)"""
    def plan(varied_lengths):
        return triton_attention._plan(
            num_seqs=1, num_tokens=1, num_heads=9, head_dim=64, num_kv_heads=3, paged=True, block_size=16,
            dtype=torch.float16, device=torch.device("cpu"), decode=True, max_context_len=2048, max_query_len=1,
            partition_size=None, config=None, varied_lengths=varied_lengths,
        )  # fmt: skip

    serving, direct = plan(True), plan(False)
    assert (serving.partition_size, serving.num_partitions, serving.meta["TILE"]) == (128, 16, 64)
    assert serving.meta["MERGE_GROUP"] == 16 and serving.meta["num_warps"] == 2  # merged in one level
    assert (direct.partition_size, direct.num_partitions, direct.meta["TILE"]) == (1024, 2, 128)


def test_a_batch_of_one_streams_a_long_context_in_small_tiles(monkeypatch):
    """A batch of one has no lengths to balance: past 1 MB of keys per KV head it takes 16 KB tiles
    and ~4 programs per multiprocessor; a shorter context, and a small batch that may vary, keep
    32 KB tiles. (An H200's 132 multiprocessors, Llama-3-8B's 256-byte rows.)"""
    monkeypatch.setattr(triton_attention, "_num_multiprocessors", lambda device: 132)

    def config(num_seqs, context):
        return triton_attention._launch_config(num_seqs, 8, 256, context, torch.device("cpu"), varied_lengths=False)

    assert config(1, 8192) == config(1, 65536) == {"TILE": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4}
    assert config(1, 4096)["TILE"] == config(8, 8192)["TILE"] == 128
    assert config(1, 4096)["programs_per_sm"] == config(8, 8192)["programs_per_sm"] == 8


@needs_triton
def test_prefill_with_bounds_equals_prefill_without():
    """``max_context_len``/``max_query_len`` only size the grid: the result is the same."""
    gen = torch.Generator().manual_seed(22)
    k_cache, v_cache, tables, lens = random_paged(3, 50, 2, 64, 8, torch.float32, gen)
    num_new = torch.minimum(lens, torch.tensor([7, 1, 12], device=lens.device))
    query_start_loc = torch.cat([num_new.new_zeros(1), num_new.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(num_new.sum()), 4, 64, generator=gen).to(DEVICE)
    read_back = ops.paged_prefill_attention(q, k_cache, v_cache, tables, lens, query_start_loc)
    bounded = ops.paged_prefill_attention(
        q, k_cache, v_cache, tables, lens, query_start_loc, max_context_len=64, max_query_len=16
    )
    assert torch.equal(read_back, bounded)


def test_prefill_with_bounds_reads_no_index_values():
    """With both bounds, the prefill check reads no index value: every tensor may be on the meta
    device (no data at all), so from a GPU the call never waits for it."""
    meta = torch.device("meta")
    q, k_cache = torch.empty(5, 4, 64, device=meta), torch.empty(4, 16, 2, 64, device=meta)
    args = (q, k_cache, torch.empty_like(k_cache), torch.empty(2, 3, dtype=torch.int32, device=meta),
            torch.empty(2, dtype=torch.int32, device=meta), torch.empty(3, dtype=torch.int32, device=meta))  # fmt: skip
    *_, longest, most_new = checks.check_paged_prefill_attention(*args, max_context_len=40, max_query_len=4)
    assert (longest, most_new) == (40, 4)


def test_bad_prefill_bounds_name_the_argument():
    k = torch.zeros(4, 16, 2, 64)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    tables = torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 2, 5], dtype=torch.int32)
    q = torch.zeros(5, 4, 64)
    with pytest.raises(ValueError, match="^max_query_len: give max_context_len and max_query_len together"):
        ops.paged_prefill_attention(q, k, k.clone(), tables, lens, query_start_loc, max_context_len=20)
    with pytest.raises(ValueError, match="^max_context_len: 19 is below a context length"):
        ops.paged_prefill_attention(q, k, k.clone(), tables, lens, query_start_loc, max_context_len=19, max_query_len=3)
    with pytest.raises(ValueError, match="^max_query_len: 2 is below a sequence's new tokens"):
        ops.paged_prefill_attention(q, k, k.clone(), tables, lens, query_start_loc, max_context_len=20, max_query_len=2)
