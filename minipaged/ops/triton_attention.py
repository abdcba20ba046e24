"""The PagedAttention kernel (§4.1) in Triton: decode and prefill, paged or contiguous.

The paper's idea: a sequence's keys and values live in fixed-size blocks scattered over a
pool, and the attention kernel fetches them through the sequence's block table while it
computes, so the cache never has to be contiguous. This file has ONE attention kernel:

* ``PAGED`` (constexpr) picks how a token's row is found: through the block table
  (``block_tables[seq, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE``) or, for the
  contiguous baseline, at ``starts[seq] + pos``. Everything else is shared, so the cost of
  paging is measured kernel against kernel (the paper's Fig. 18a).
* ``DECODE`` (constexpr) picks one query token per sequence (decode) or a packed batch of
  new tokens with a causal mask (prefill, chunked prefill, prefix caching, recompute).

Grouped-query attention: a program owns one KV head and ALL the query heads that share it,
so each K/V tile is read from memory once and multiplied against the whole group (rows of
the ``[BLOCK_M, HEAD_DIM]`` query tile are (token, head-in-group) pairs).

Split-K ("FlashDecoding", vLLM's paged attention v2): in decode, a sequence's context is cut
into partitions processed by separate programs, so one long sequence still fills every
multiprocessor. Each partition writes its normalised partial output with its running max and
exp-sum into one float32 workspace (cached per device, not allocated per call), and they are
merged by each partition's share of the softmax denominator, in the same launch: the *last*
partition of (sequence, KV head) to finish, found by an atomic ticket counter, merges them. One
program holds ~16 partitions' partials in registers; more are merged in two levels (the last of
each group merges its group, the last group merges the groups), so no program walks a long serial
tail and no second kernel is launched (notes/kernels.md, v5, v7 and "Stop 29"). A sequence whose
context fits one partition (every sequence, without split-K) has its output written directly.

Prefill is compute-bound, as in FlashAttention's forward pass: only the tiles on a program's
diagonal are masked (``_attend`` with ``MASKED``), and the query blocks of one (sequence, KV
head) are launched together, longest first, so they share its keys in L2 (notes/kernels.md).

Host cost: a call does no work that grows with the batch, allocates only its output, and
launches one kernel through ``launch.launch``, which skips most of Triton's per-call host work.
The grid arithmetic is plain Python integers (``launch.cdiv``, ``launch.next_power_of_2``):
``triton.cdiv`` is a constexpr function that costs microseconds per call outside a kernel.

The softmax is the online (streaming) softmax of FlashAttention, in float32 with ``exp2``.
All row offsets are computed in int64, so pools larger than 2**31 elements work.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from minipaged.ops.launch import cdiv, launch, next_power_of_2

LOG2_E = 1.4426950408889634
WHOLE_CONTEXT = 1 << 30  # the partition size that means "no split-K" (a multiple of any tile)
FUSED_MERGE_ELEMENTS = 8192  # the most partial outputs (heads x partitions x dims) one program merges
MAX_PARTITIONS = 128  # split-K's most partitions per sequence


@triton.jit
def _block_numbers(table, tile_start, kv_end, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
    """Physical block of each token of the tile at ``tile_start`` (int64; 0 past ``kv_end``)."""
    if BLOCK_SIZE >= TILE:  # the whole tile sits in one block: one table entry
        block = tl.load(table + tile_start // BLOCK_SIZE, mask=tile_start < kv_end, other=0)
    else:
        pos = tile_start + tl.arange(0, TILE)
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos < kv_end, other=0)
    return block.to(tl.int64)


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """``a @ b`` with a float32 result; ``a`` is taken at ``b``'s dtype (the cache's: q has it
    already, the float32 probabilities are rounded to it for the tensor cores).

    The one home of an interpreter workaround: with ``FP32_DOT`` both operands are multiplied in
    exact float32 ("ieee", no tf32 rounding). ``_fp32_dot`` sets it for float32 inputs, and for
    bfloat16 under the CPU interpreter, whose bfloat16 ``tl.dot`` returns garbage (Triton 3.9).
    """
    if FP32_DOT:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a.to(b.dtype), b)
    return product


@triton.jit
def _load_tile(ptrs, pos_valid, dim_valid, MASK_ROWS: tl.constexpr, PAD_DIMS: tl.constexpr):
    """A ``[TILE, HEAD_DIM_PAD]`` tile of K or V, masked only where it has to be: a load with no
    row mask keeps 16-byte vectors and needs no predicate per element."""
    if PAD_DIMS:
        if MASK_ROWS:
            tile = tl.load(ptrs, mask=pos_valid[:, None] & dim_valid[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=dim_valid[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=pos_valid[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend(
    acc, running_max, running_sum, q, query_pos,
    k_ptr, v_ptr, table, first, last, kv_end, scale_log2,
    stride_k_block, stride_k_token, stride_v_block, stride_v_token, dims, dim_valid,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PAGED: tl.constexpr, PAD_DIMS: tl.constexpr,
    MASKED: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    """Fold the context tiles that start in ``[first, last)`` into the online softmax.

    ``table`` is the sequence's block-table row (``PAGED``) or its slab's first row. ``MASKED``
    tiles may reach past ``kv_end`` or past a query's causal limit ``query_pos``; the others
    are known to be wholly visible.
    """
    for tile_start in range(first, last, TILE):
        pos = tile_start + tl.arange(0, TILE)
        pos_valid = pos < kv_end
        # Where each token of the tile lives: the only place paging enters the kernel.
        if PAGED:
            block = _block_numbers(table, tile_start, kv_end, BLOCK_SIZE, TILE)
            k_rows = block * stride_k_block + (pos % BLOCK_SIZE) * stride_k_token
            v_rows = block * stride_v_block + (pos % BLOCK_SIZE) * stride_v_token
        else:
            k_rows = (table + pos) * stride_k_token
            v_rows = (table + pos) * stride_v_token
        k = _load_tile(k_ptr + k_rows[:, None] + dims[None, :], pos_valid, dim_valid, MASKED, PAD_DIMS)
        v = _load_tile(v_ptr + v_rows[:, None] + dims[None, :], pos_valid, dim_valid, MASKED, PAD_DIMS)

        # Scores in log2 units; keys past the context or after the query are -inf.
        scores = _dot(q, tl.trans(k), FP32_DOT) * scale_log2
        if MASKED:
            visible = pos_valid[None, :] & (pos[None, :] <= query_pos[:, None])
            scores = tl.where(visible, scores, float("-inf"))

        # Online softmax: rescale what was accumulated so far to the new running max.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + _dot(probs, v, FP32_DOT)
        running_max = new_max
    return acc, running_max, running_sum


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, program, num_kv_heads, TOKENS: tl.constexpr):
    """Prefill: the sequence whose programs include ``program`` (a binary search of the starts).

    Sequence ``s`` owns the programs from ``(query_start_loc[s] // TOKENS + s) * num_kv_heads``
    on: room for its query blocks of ``TOKENS`` new tokens (at most ``n_s // TOKENS + 1`` of them),
    for every KV head. Those starts follow from the query starts alone, so the grid needs only
    the step's token and sequence counts, never a sequence's length (vLLM's unified attention
    finds its sequence the same way).
    """
    high = num_seqs - 1
    low = high * 0
    while low < high:
        mid = (low + high + 1) // 2
        start = (tl.load(query_start_ptr + mid) // TOKENS + mid) * num_kv_heads
        low = tl.where(start <= program, mid, low)
        high = tl.where(start <= program, high, mid - 1)
    return low


# Triton compiles a variant per "shape" of each integer argument (equal to 1, a multiple of 16, or
# neither). The sequence count and the block tables' row stride (their width: the step's longest
# sequence) change from step to step, so they are left unspecialised: one compiled kernel serves
# every step, instead of a compilation the first time a width or count is odd.
@triton.jit(do_not_specialize=["num_seqs", "stride_tables_seq"])
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    starts_ptr,
    lens_ptr,
    query_start_ptr,
    partials_ptr,
    counters_ptr,
    scale_log2,
    partition_size,
    num_partitions,
    num_heads,
    num_seqs,
    stride_q_token, stride_q_head,
    stride_out_token, stride_out_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_tables_seq,
    QUERIES_PER_KV: tl.constexpr,
    QUERIES_PER_KV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PAGED: tl.constexpr,
    DECODE: tl.constexpr,
    SPLIT: tl.constexpr,
    MERGE_GROUP: tl.constexpr,
    MERGE_GROUPS: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # Rows of the query tile: (token, head within the KV group) pairs.
    tokens_per_block: tl.constexpr = BLOCK_M // QUERIES_PER_KV_PAD
    num_kv_heads = num_heads // QUERIES_PER_KV
    if DECODE:  # axes: sequence, KV head, context partition
        seq, kv_head, partition, query_block = tl.program_id(0), tl.program_id(1), tl.program_id(2), 0
        first_query, num_new = seq, 1
    else:
        # One axis: sequence, then KV head, then block of new tokens (see _find_sequence). The
        # blocks of one (sequence, head) run side by side, so they find its keys and values in L2;
        # and last to first, since the last ones see the most keys and the short ones should fill
        # the tail of the launch. Programs past a sequence's blocks (or past the step's tokens, in a
        # CUDA graph padded to more) stop at once.
        program = tl.program_id(0)
        seq = _find_sequence(query_start_ptr, num_seqs, program, num_kv_heads, tokens_per_block)
        partition = 0
        first_query = tl.load(query_start_ptr + seq)
        num_new = tl.load(query_start_ptr + seq + 1) - first_query
        blocks_owned = (first_query + num_new) // tokens_per_block - first_query // tokens_per_block + 1
        local = program - (first_query // tokens_per_block + seq) * num_kv_heads
        kv_head = local // blocks_owned
        query_block = tl.cdiv(num_new, tokens_per_block) - 1 - local % blocks_owned

    length = tl.load(lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    token = query_block * tokens_per_block + rows // QUERIES_PER_KV_PAD
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV_PAD
    row_valid = (rows % QUERIES_PER_KV_PAD < QUERIES_PER_KV) & (token < num_new)
    query_pos = length - num_new + token  # causal limit: a query sees keys at <= its position
    first_pos = length - num_new + query_block * tokens_per_block  # position of its first query

    # Keys this program visits: its partition, cut at the last query's position.
    kv_start = partition * partition_size
    kv_end = tl.minimum(kv_start + partition_size, length)
    if not DECODE:
        kv_end = tl.minimum(kv_end, first_pos + tokens_per_block)
    if kv_start >= kv_end or query_block < 0 or kv_head >= num_kv_heads:
        return

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q_rows = (first_query + token).to(tl.int64) * stride_q_token + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    if PAGED:
        table = tables_ptr + seq.to(tl.int64) * stride_tables_seq
    else:
        table = tl.load(starts_ptr + seq).to(tl.int64)  # the contiguous slab's first row
    k_ptr += kv_head * stride_k_head
    v_ptr += kv_head * stride_v_head
    # In prefill, the tiles that end at or before the FIRST query's causal limit (and the
    # context end) are wholly visible to every row: they need no mask at all (plain loads, no
    # -inf select), and only the few tiles on the diagonal pay for masking. Decode gains
    # nothing from the split (notes/kernels.md) and masks its one loop.
    unmasked_end = kv_start
    if not DECODE:
        first_visible_end = tl.minimum(kv_end, first_pos + 1)
        unmasked_end = kv_start + (first_visible_end - kv_start) // TILE * TILE
        acc, running_max, running_sum = _attend(
            acc, running_max, running_sum, q, query_pos, k_ptr, v_ptr, table, kv_start, unmasked_end, kv_end,
            scale_log2, stride_k_block, stride_k_token, stride_v_block, stride_v_token, dims, dim_valid,
            BLOCK_SIZE, TILE, PAGED, HEAD_DIM != HEAD_DIM_PAD, False, FP32_DOT,
        )  # fmt: skip
    acc, running_max, running_sum = _attend(
        acc, running_max, running_sum, q, query_pos, k_ptr, v_ptr, table, unmasked_end, kv_end, kv_end,
        scale_log2, stride_k_block, stride_k_token, stride_v_block, stride_v_token, dims, dim_valid,
        BLOCK_SIZE, TILE, PAGED, HEAD_DIM != HEAD_DIM_PAD, True, FP32_DOT,
    )  # fmt: skip

    out = acc / running_sum[:, None]
    # A sequence whose context fits one partition has nothing to merge: its one program writes
    # the output as without split-K. (In an engine's CUDA graph, planned for the longest context it
    # may see, the padding rows and the short sequences are such.)
    used = tl.cdiv(length, partition_size)  # partitions holding the context (1 without split-K)
    partials_needed = False
    if SPLIT:
        partials_needed = used > 1
    if partials_needed:
        num_slots = tl.num_programs(0) * num_heads * num_partitions
        slot = (seq * num_heads + head) * num_partitions + partition
        _store_partial(partials_ptr, slot, num_slots, running_max, running_sum, out, row_valid, HEAD_DIM_PAD)
        # The last partition of (seq, KV head) to finish merges them, found by a ticket counter:
        # each program takes one once its partials are stored (the barrier: stored by every thread;
        # the atomic's acquire-release: visible to whoever draws the last ticket). Partitions come in
        # groups of MERGE_GROUP, as many as one program merges at once (their partials in registers).
        # With more than one group, the last of each group merges it into the group's first slot
        # (its partials are read by then) and the last group to finish merges the groups. A counter
        # goes back to 0 for the next call.
        tl.debug_barrier()
        num_groups = 1 if MERGE_GROUPS == 1 else tl.cdiv(used, MERGE_GROUP)  # constant: one level is compiled alone
        groups_max = tl.cdiv(num_partitions, MERGE_GROUP)  # counters per (seq, KV head): one per group, one for all
        counters = counters_ptr + (seq * num_kv_heads + kv_head) * (groups_max + 1)
        group = partition // MERGE_GROUP
        first, in_group = group * MERGE_GROUP, tl.minimum(used - group * MERGE_GROUP, MERGE_GROUP)
        first_head = kv_head * QUERIES_PER_KV
        if tl.atomic_add(counters + group, 1, sem="acq_rel") == in_group - 1:
            tl.store(counters + group, 0)
            top, total, merged = _merge(
                partials_ptr, seq, first_head, first, 1, in_group, num_heads, num_partitions, num_slots,
                QUERIES_PER_KV, QUERIES_PER_KV_PAD, HEAD_DIM_PAD, MERGE_GROUP,
            )  # fmt: skip
            if num_groups == 1:
                _store_heads(out_ptr, seq, first_head, merged, stride_out_token, stride_out_head,
                             QUERIES_PER_KV, QUERIES_PER_KV_PAD, HEAD_DIM, HEAD_DIM_PAD)  # fmt: skip
            else:
                heads = tl.arange(0, QUERIES_PER_KV_PAD)
                group_slot = (seq * num_heads + first_head + heads) * num_partitions + first
                _store_partial(
                    partials_ptr, group_slot, num_slots, top, total, merged, heads < QUERIES_PER_KV, HEAD_DIM_PAD
                )  # fmt: skip
                tl.debug_barrier()
                if tl.atomic_add(counters + groups_max, 1, sem="acq_rel") == num_groups - 1:
                    tl.store(counters + groups_max, 0)
                    top, total, merged = _merge(
                        partials_ptr, seq, first_head, 0, MERGE_GROUP, num_groups, num_heads, num_partitions,
                        num_slots, QUERIES_PER_KV, QUERIES_PER_KV_PAD, HEAD_DIM_PAD, MERGE_GROUPS,
                    )  # fmt: skip
                    _store_heads(out_ptr, seq, first_head, merged, stride_out_token, stride_out_head,
                                 QUERIES_PER_KV, QUERIES_PER_KV_PAD, HEAD_DIM, HEAD_DIM_PAD)  # fmt: skip
    else:
        out_rows = (first_query + token).to(tl.int64) * stride_out_token + head * stride_out_head
        tl.store(
            out_ptr + out_rows[:, None] + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit
def _store_partial(partials_ptr, slot, num_slots, running_max, running_sum, out, valid, HEAD_DIM_PAD: tl.constexpr):
    """A partition's result for the merge, at ``slot`` of the workspace (rows ``valid``): its running
    max and exp-sum per row and its normalised output (all maxes, then all sums, then all outputs;
    see ``_partials_numel``)."""
    tl.store(partials_ptr + slot, running_max, mask=valid)
    tl.store(partials_ptr + num_slots + slot, running_sum, mask=valid)
    dims = tl.arange(0, HEAD_DIM_PAD)
    tl.store(partials_ptr + 2 * num_slots + slot[:, None].to(tl.int64) * HEAD_DIM_PAD + dims[None, :], out,
             mask=valid[:, None])  # fmt: skip


@triton.jit
def _merge(
    partials_ptr, seq, first_head, first, stride, count, num_heads, num_partitions, num_slots,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PARTS: tl.constexpr,
):  # fmt: skip
    """Split-K's second half for query heads ``first_head .. first_head + HEADS`` of one sequence:
    the partials of partitions ``first, first + stride, ...`` (``count`` of them, at most ``PARTS``),
    each weighed by its share of the softmax denominator. Returns them as one partial: a max, an
    exp-sum and the normalised output per head. Loads skip L1 (``.cg``): other programs wrote them."""
    heads = tl.arange(0, HEADS_PAD)
    parts = tl.arange(0, PARTS)
    valid = (heads[:, None] < HEADS) & (parts[None, :] < count)
    slot = (seq * num_heads + first_head + heads[:, None]) * num_partitions + first + parts[None, :] * stride
    maxes = tl.load(partials_ptr + slot, mask=valid, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(partials_ptr + num_slots + slot, mask=valid, other=0.0, cache_modifier=".cg")
    real_head = heads < HEADS
    top = tl.where(real_head, tl.max(maxes, axis=1), 0.0)  # padding heads: no -inf - -inf
    weights = sums * tl.exp2(maxes - top[:, None])  # unused partitions (and padding heads) weigh 0
    total = tl.where(real_head, tl.sum(weights, axis=1), 1.0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    part_out = partials_ptr + 2 * num_slots + slot[:, :, None].to(tl.int64) * HEAD_DIM_PAD + dims[None, None, :]
    partial = tl.load(part_out, mask=valid[:, :, None], other=0.0, cache_modifier=".cg")
    return top, total, tl.sum(partial * weights[:, :, None], axis=1) / total[:, None]


@triton.jit
def _store_heads(
    out_ptr, seq, first_head, out, stride_out_seq, stride_out_head,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    """The merged output of query heads ``first_head .. first_head + HEADS`` of one sequence."""
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    rows = seq.to(tl.int64) * stride_out_seq + (first_head + heads) * stride_out_head
    tl.store(out_ptr + rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(heads[:, None] < HEADS) & (dims[None, :] < HEAD_DIM))  # fmt: skip


@functools.cache
def _num_multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: enough to exercise split-K on small shapes


def choose_partition_size(
    num_seqs: int,
    num_kv_heads: int,
    max_context_len: int,
    device: torch.device,
    tile: int,
    programs_per_sm: int = 2,
    max_partitions: int = MAX_PARTITIONS,
) -> int:
    """Smallest power-of-two partition (>= tile) that still gives ~programs_per_sm programs per SM.

    Returns ``max_context_len`` rounded up to the tile (one partition, no merge) when the batch
    alone fills the GPU.
    """
    whole = cdiv(max_context_len, tile) * tile
    wanted = programs_per_sm * _num_multiprocessors(device)
    per_seq = cdiv(wanted, num_seqs * num_kv_heads)
    if per_seq <= 1:
        return whole
    size = max(tile, next_power_of_2(cdiv(max_context_len, per_seq)))
    size = max(size, next_power_of_2(cdiv(max_context_len, max_partitions)))
    return min(size, whole)


def _fp32_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """The kernel's ``FP32_DOT`` switch (why: see ``_dot``)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu")


def _launch_config(
    num_seqs: int, num_kv_heads: int, row_bytes: int, max_context_len: int, device: torch.device, varied_lengths: bool
) -> dict[str, int]:
    """Decode: context tile and launch shape, tuned on an H200 (notes/kernels.md).

    When the batch alone gives fewer (sequence, KV head) programs than the GPU has
    multiprocessors, split-K makes long partitions: big tiles (32 KB of K per step) stream
    them best, and ~8 programs per multiprocessor keep sequences of unequal length balanced.
    Otherwise many short programs run at once: 16 KB tiles. Both: 4 warps, 2 stages.
    ``row_bytes`` is one token's K row as the kernel multiplies it (padded head dim).

    A server's batch (``varied_lengths``: the lengths differ, and ``max_context_len`` may be only
    the bound a CUDA graph was planned for) is cut finer: 8 KB tiles on 2 warps and ~32 programs
    per multiprocessor (on an H200 at a bound of 2048, SmolLM2's 8-64 sequences get pieces of
    64-128 tokens, 256 sequences pieces of 512). A long sequence is spread
    over many multiprocessors instead of one program walking it while the short ones are long
    done; a short one fits one piece and writes its output directly. On SmolLM2's shape with
    48-64 ShareGPT-like contexts that halves the kernel's time. On equal lengths the plans above
    are mostly faster (up to 25% on Llama-3-8B's shape), so a direct call keeps them
    (notes/kernels.md, "Decode plans for a server's batch").

    A batch of one has no lengths to balance. Past 1 MB of keys per KV head (4K tokens at
    Llama-3-8B's shape) its context is cut for 16 KB tiles, ~4 programs per multiprocessor: three
    fit on one at a time, where a 32 KB tile in two stages leaves room for one. On an H200 that is
    5-7% faster from 8K to 64K tokens. Up to 4K the big tiles are as fast or faster (1 x 2K:
    11.7-12.1 against 12.7-12.9 us, both merged in the kernel; notes/kernels.md, "Stop 28" and "Stop 29").
    """
    if varied_lengths:
        return {"TILE": max(16, 8192 // row_bytes), "num_warps": 2, "num_stages": 2, "programs_per_sm": 32}
    if num_seqs == 1 and max_context_len * row_bytes > 1 << 20:
        return {"TILE": max(16, 16384 // row_bytes), "num_warps": 4, "num_stages": 2, "programs_per_sm": 4}
    if num_seqs * num_kv_heads < _num_multiprocessors(device):
        return {"TILE": max(16, 32768 // row_bytes), "num_warps": 4, "num_stages": 2, "programs_per_sm": 8}
    return {"TILE": max(16, 16384 // row_bytes), "num_warps": 4, "num_stages": 2, "programs_per_sm": 2}


def _prefill_config(head_dim_pad: int, fp32_dot: bool, device: torch.device, max_query_len: int) -> dict[str, int]:
    """Prefill: query rows per program, context tile and launch shape, tuned on an H100
    (``kernel_bench --tune-prefill``, ``figures/kernel_tune_prefill.csv``, notes/kernels.md).

    Prefill is compute-bound, like FlashAttention's forward pass. Long prompts (2K new tokens
    and up) take 128 query rows (32 tokens of a 4-head group) against 128-key tiles on 8 warps:
    1-17% faster than the small shape there. Shorter ones take 64 rows against 64-key tiles on 4
    warps, which makes twice the programs: 6-29% faster on 128-1024 new tokens without a long
    prefix (1-5% slower on 512 after a 2K prefix). float32 operands, wide heads and the
    interpreter take 32-key tiles and 2 stages (half the shared memory).
    """
    if fp32_dot or device.type != "cuda" or head_dim_pad > 128:
        return {"BLOCK_M": 64, "TILE": 32, "num_warps": 4, "num_stages": 2}
    if max_query_len >= 2048:
        return {"BLOCK_M": 128, "TILE": 128, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "TILE": 64, "num_warps": 4, "num_stages": 3}


# Split-K partials (float32) and the fused merge's ticket counters (int32), one buffer of each per
# device, reused by every call instead of allocations per call. A buffer only grows; one it
# outgrows is kept alive, because a CUDA graph captured earlier still uses it. Buffers start at
# zero, and every merge puts its counter back to zero. Calls that share them must run one after
# another on one stream (each call's merge reads the partials before the next call writes them),
# which is how an engine and the benchmark call attention.
_workspaces: dict[tuple[torch.device, torch.dtype], Tensor] = {}
_outgrown: list[Tensor] = []


def _workspace(device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
    buffer = _workspaces.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:
            _outgrown.append(buffer)
        buffer = torch.zeros(next_power_of_2(numel), device=device, dtype=dtype)
        _workspaces[device, dtype] = buffer
    return buffer


def _partials_numel(num_seqs: int, num_heads: int, num_partitions: int, head_dim_pad: int) -> int:
    """Floats of split-K partials: a max and a sum per (seq, head, partition), then the outputs."""
    return num_seqs * num_heads * num_partitions * (2 + head_dim_pad)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about a call that follows from its shapes: grids, constexprs, split-K."""

    grid: tuple[int, int, int]
    partition_size: int
    num_partitions: int
    meta: dict[str, int | bool]  # the kernel's constexprs and launch options
    partials_numel: int  # 0 without split-K
    counters_numel: int  # the merge's ticket counters (0 without split-K)


@functools.cache
def _plan(
    num_seqs: int,
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    paged: bool,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    decode: bool,
    max_context_len: int,
    max_query_len: int,
    partition_size: int | None,
    config: tuple[tuple[str, int], ...] | None,
    varied_lengths: bool,
) -> _Plan:
    """The launch plan of a call, cached: a call with the same shapes (every decode step of an
    engine at one batch size and context bound) reuses it instead of redoing the arithmetic."""
    fp32_dot = _fp32_dot(dtype, device)
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    head_dim_pad = next_power_of_2(head_dim)
    max_group = max(2, FUSED_MERGE_ELEMENTS // (group_pad * head_dim_pad))  # partitions one merge holds
    if decode:
        row_bytes = head_dim_pad * (4 if fp32_dot else dtype.itemsize)
        settings = _launch_config(num_seqs, num_kv_heads, row_bytes, max_context_len, device, varied_lengths)
    else:
        settings = _prefill_config(head_dim_pad, fp32_dot, device, max_query_len)
    settings.update(config or ())  # an override changes only what it names
    tile = settings["TILE"]
    if decode:
        block_m = max(16, group_pad)
        # _block_numbers reads one table entry per tile when blocks are at least a tile long,
        # which needs every tile to start at a multiple of the tile (or fit in a partition).
        assert partition_size is None or partition_size % tile == 0 or tile % partition_size == 0, (
            f"partition_size {partition_size} must divide or be a multiple of the tile {tile}"
        )
        if partition_size is None:
            partition_size = choose_partition_size(
                num_seqs, num_kv_heads, max_context_len, device, tile, settings.get("programs_per_sm", 2),
                max_partitions=min(MAX_PARTITIONS, max(2, max_group // 2) * max_group),
            )
        num_partitions = cdiv(max_context_len, partition_size)
    else:
        block_m = max(16, group_pad, settings["BLOCK_M"])
        num_partitions = 1
    split = num_partitions > 1
    if not split:  # one partition holds any context: one value, so one launch key for every length
        partition_size = WHOLE_CONTEXT
    # The merge (see the kernel's tail): one level when a program holds every partition's partials;
    # else groups of half that, so the group merges on the launch's tail are short, and one level more.
    merge_group = settings.get("merge_group", max_group if num_partitions <= max_group else max(2, max_group // 2))
    merge_group = min(merge_group, max(2, next_power_of_2(num_partitions)))
    merge_groups = next_power_of_2(cdiv(num_partitions, merge_group))  # the second level's (1: none)
    meta = dict(
        QUERIES_PER_KV=group, QUERIES_PER_KV_PAD=group_pad, BLOCK_M=block_m,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, TILE=tile,
        PAGED=paged, DECODE=decode, SPLIT=split,
        MERGE_GROUP=merge_group if split else 1, MERGE_GROUPS=merge_groups if split else 1,
        FP32_DOT=fp32_dot, num_warps=settings["num_warps"], num_stages=settings["num_stages"],
    )  # fmt: skip
    partials = _partials_numel(num_seqs, num_heads, num_partitions, head_dim_pad) if split else 0
    if decode:
        grid = (num_seqs, num_kv_heads, num_partitions)
    else:  # room for every sequence's query blocks, for every KV head (see _find_sequence)
        grid = ((num_tokens // (block_m // group_pad) + num_seqs) * num_kv_heads, 1, 1)
    counters = num_seqs * num_kv_heads * (cdiv(num_partitions, merge_group) + 1) if split else 0
    return _Plan(grid, partition_size, num_partitions, meta, partials, counters)


def attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    block_tables: Tensor | None = None,
    starts: Tensor | None = None,
    context_lens: Tensor,
    query_start_loc: Tensor | None = None,
    max_context_len: int,
    max_query_len: int = 1,
    scale: float,
    partition_size: int | None = None,
    config: dict[str, int] | None = None,
    out: Tensor | None = None,
    varied_lengths: bool = False,
) -> Tensor:
    """Launch the kernel. Paged when ``block_tables`` is given (``k_cache [blocks, block_size,
    H_kv, D]``), contiguous otherwise (``k_cache [slots, H_kv, D]`` and ``starts``); decode when
    ``query_start_loc`` is None. Arguments are assumed checked (see ``minipaged.ops.checks``).
    The head dimension of q, the caches and ``out`` must be contiguous (their other strides are
    free) and the batch non-empty. ``partition_size`` and ``config`` override the heuristics;
    ``out`` (shaped like ``q``) receives the result. ``varied_lengths`` plans decode for a
    server's batch (see ``_launch_config``).
    """
    paged, decode = block_tables is not None, query_start_loc is None
    num_seqs = context_lens.shape[0]
    _, num_heads, head_dim = q.shape
    plan = _plan(
        num_seqs, q.shape[0], num_heads, head_dim, k_cache.shape[-2], paged, k_cache.shape[1] if paged else 1,
        q.dtype, q.device, decode, max_context_len, max_query_len,
        partition_size, None if config is None else tuple(config.items()), varied_lengths,
    )  # fmt: skip

    # q may be a view (the model's fused QKV product): the kernel reads it through its strides
    # and writes ``out`` through its own.
    out = torch.empty_like(q) if out is None else out  # a third of torch.empty(q.shape, ...)'s host time
    # Triton wants a tensor for every pointer argument, also for those a constexpr switch leaves
    # unread: the block table or the slab starts (PAGED), the query starts (DECODE), the split-K
    # partials and the merge's counters (SPLIT). Those get a tensor already at hand
    # (``context_lens``, ``out``), so nothing is allocated for them.
    unread = context_lens
    partials = _workspace(q.device, plan.partials_numel) if plan.partials_numel else out
    counters = _workspace(q.device, plan.counters_numel, torch.int32) if plan.counters_numel else unread
    k_strides, v_strides = k_cache.stride(), v_cache.stride()
    if paged:
        k_strides, v_strides = k_strides[:3], v_strides[:3]
        tables, table_stride = block_tables, block_tables.stride(0)
    else:  # the arena as a pool of one-token blocks; the block stride is never used
        k_strides, v_strides = (0, *k_strides[:2]), (0, *v_strides[:2])
        tables, table_stride = unread, 0
    q_strides, out_strides = q.stride(), out.stride()
    launch(
        _attention_kernel, plan.grid,
        (
            q, k_cache, v_cache, out,
            tables, unread if starts is None else starts, context_lens, unread if decode else query_start_loc,
            partials, counters,
            scale * LOG2_E, plan.partition_size, plan.num_partitions, num_heads, 1 if decode else num_seqs,
            q_strides[0], q_strides[1],
            out_strides[0], out_strides[1],
            *k_strides,
            *v_strides,
            table_stride,
        ),
        **plan.meta,
    )  # fmt: skip
    return out
