"""Public entry points of ``minipaged.ops``: check the arguments, then run Triton or the reference.

Triton runs when the tensors are on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1``
(how the tests drive the kernels without a GPU). Everything else, and any case a kernel does
not cover, runs the plain-PyTorch reference. Each call logs which one ran at debug level.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from minipaged.ops import reference, triton_attention, triton_cache
from minipaged.ops.checks import (
    FLOAT_DTYPES,
    check_attention,
    check_cache_pair,
    check_index,
    check_range,
    check_tensor,
    on_host,
    require,
)
from minipaged.ops.metadata import AttentionMetadata

logger = logging.getLogger("minipaged.ops")


def triton_available(tensor: Tensor) -> bool:
    """Whether Triton can run on this tensor's device."""
    device = tensor.device
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _log(op: str, backend: str, why: str = "") -> None:
    logger.debug("%s: %s%s", op, backend, f" ({why})" if why else "")


def write_to_cache(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store ``key``/``value [T, H_kv, D]`` at slots ``slot_mapping [T]`` (-1 = skip), §5.1."""
    key_, value_ = check_cache_pair(key, value, 3, ("key", "value"))
    k, v = check_cache_pair(k_cache, v_cache, 4, ("k_cache", "v_cache"))
    require(key_.device == k.device, "key", "on {}, but k_cache is on {}", key_.device, k.device)
    require(
        key_.shape[1:] == k.shape[2:],
        "key",
        "rows {} differ from k_cache's {}",
        tuple(key_.shape[1:]),
        tuple(k.shape[2:]),
    )
    slots = check_index(slot_mapping, "slot_mapping", (key_.shape[0],), k.device)
    if on_host(slot_mapping):
        check_range(slot_mapping, "slot_mapping", k.shape[0] * k.shape[1], "slots", allow_minus_one=True)
    if not triton_available(k):
        _log("write_to_cache", "reference", f"{k.device.type} tensors without TRITON_INTERPRET=1")
        reference.write_to_cache(key_, value_, k, v, slots)
    elif key_.stride(-1) != 1 or value_.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        _log("write_to_cache", "reference", "head dimension not contiguous")
        reference.write_to_cache(key_, value_, k, v, slots)
    else:
        _log("write_to_cache", "triton")
        triton_cache.write_to_cache(key_, value_, k, v, slots)


def copy_blocks(k_caches: list[Tensor], v_caches: list[Tensor], block_mapping: Tensor) -> None:
    """Copy blocks ``block_mapping[:, 0] -> block_mapping[:, 1]`` in every layer (copy-on-write, §4.4)."""
    require(len(k_caches) == len(v_caches), "v_caches", "{} layers, k_caches has {}", len(v_caches), len(k_caches))
    for layer, (k, v) in enumerate(zip(k_caches, v_caches, strict=True)):
        check_cache_pair(k, v, 4, (f"k_caches[{layer}]", f"v_caches[{layer}]"))
    if not k_caches:
        return
    mapping = check_index(block_mapping, "block_mapping", (-1, 2), k_caches[0].device)
    if on_host(block_mapping):
        check_range(block_mapping, "block_mapping", k_caches[0].shape[0], "blocks")
    if not triton_available(k_caches[0]):
        _log("copy_blocks", "reference", f"{k_caches[0].device.type} tensors without TRITON_INTERPRET=1")
        reference.copy_blocks(k_caches, v_caches, mapping)
    elif not all(cache.is_contiguous() for cache in (*k_caches, *v_caches)):
        _log("copy_blocks", "reference", "caches not contiguous")
        reference.copy_blocks(k_caches, v_caches, mapping)
    else:
        _log("copy_blocks", "triton")
        triton_cache.copy_blocks(k_caches, v_caches, mapping)


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Move blocks between caches on any two devices: gather, one transfer, scatter (§4.5)."""
    src_ = check_tensor(src, "src", 4, FLOAT_DTYPES)
    dst_ = check_tensor(dst, "dst", 4, FLOAT_DTYPES)
    require(
        dst_.shape[1:] == src_.shape[1:],
        "dst",
        "blocks of shape {}, src has {}",
        tuple(dst_.shape[1:]),
        tuple(src_.shape[1:]),
    )
    require(dst_.dtype == src_.dtype, "dst", "dtype {} differs from src's {}", dst_.dtype, src_.dtype)
    device = block_mapping.device if isinstance(block_mapping, Tensor) else torch.device("cpu")
    mapping = check_index(block_mapping, "block_mapping", (-1, 2), device).cpu()
    check_range(mapping[:, 0], "block_mapping", src_.shape[0], "source blocks of src")
    check_range(mapping[:, 1], "block_mapping", dst_.shape[0], "destination blocks of dst")
    _log("swap_blocks", "torch", "gather, one transfer, scatter")
    reference.swap_blocks(src_, dst_, mapping)


def _attention_backend(op: str, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when the Triton kernel covers this call; logs the choice either way."""
    if q.dtype == torch.float64:
        why = "float64 has no Triton matrix product"
    elif not 16 <= q.shape[-1] <= 256:
        why = f"head_dim {q.shape[-1]} outside 16..256"
    elif k.stride(-1) != 1 or v.stride(-1) != 1:
        why = "head dimension of the cache not contiguous"
    elif q.shape[0] == 0:
        why = "empty batch"
    elif not triton_available(q):
        why = f"{q.device.type} tensors without TRITON_INTERPRET=1"
    else:
        _log(op, "triton")
        return True
    _log(op, "reference", why)
    return False


def _check_lengths(context_lens: Tensor, num_seqs: int, device: torch.device) -> Tensor:
    """Shape always; values when the caller's tensor is on the CPU (see ``checks``)."""
    lens = check_index(context_lens, "context_lens", (num_seqs,), device)
    if on_host(context_lens):
        require(bool((context_lens >= 1).all()), "context_lens", "every sequence needs at least one token")
    return lens


def _check_bound(context_lens: Tensor, max_context_len: int) -> None:
    """``max_context_len`` sizes the split-K grid: it must bound every length."""
    require(max_context_len >= 1, "max_context_len", "must be >= 1, got {}", max_context_len)
    if on_host(context_lens):
        require(
            bool((context_lens <= max_context_len).all()),
            "max_context_len",
            "{} is below a context length",
            max_context_len,
        )


def _check_paged(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, decode: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q_, k, v = check_attention(q, k_cache, v_cache, cache_ndim=4)
    num_seqs = q_.shape[0] if decode else -1
    tables = check_index(block_tables, "block_tables", (num_seqs, -1), q_.device)
    lens = _check_lengths(context_lens, tables.shape[0], q_.device)
    require(tables.shape[1] > 0, "block_tables", "needs at least one column, got shape {}", tuple(tables.shape))
    if on_host(context_lens):
        capacity = tables.shape[1] * k.shape[1]
        require(
            bool((context_lens <= capacity).all()),
            "context_lens",
            "longer than block_tables can hold ({} tokens)",
            capacity,
        )
        if on_host(block_tables):  # only the entries a sequence uses must name real blocks
            used = torch.arange(tables.shape[1]) < (context_lens[:, None] + k.shape[1] - 1) // k.shape[1]
            check_range(block_tables[used], "block_tables", k.shape[0], "block numbers")
    return q_, k, v, tables, lens


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
    q_, k, v, tables, lens = _check_paged(q, k_cache, v_cache, block_tables, context_lens, decode=True)
    scale = q_.shape[-1] ** -0.5 if scale is None else scale
    if max_context_len is not None:
        _check_bound(context_lens, max_context_len)
    if not _attention_backend("paged_decode_attention", q_, k, v):
        return reference.paged_decode_attention(q_, k, v, tables, lens, scale=scale)
    bound = tables.shape[1] * k.shape[1] if max_context_len is None else max_context_len
    return triton_attention.attention(
        q_,
        k,
        v,
        block_tables=tables,
        starts=None,
        context_lens=lens,
        query_start_loc=None,
        max_context_len=bound,
        scale=scale,
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
    q_, k, v = check_attention(q, k_arena, v_arena, cache_ndim=3)
    starts_ = check_index(starts, "starts", (q_.shape[0],), q_.device)
    lens = _check_lengths(context_lens, q_.shape[0], q_.device)
    if on_host(starts, context_lens):
        inside = bool((starts >= 0).all() and (starts + context_lens <= k.shape[0]).all())
        require(inside, "starts", "a slab reaches outside the arena")
    scale = q_.shape[-1] ** -0.5 if scale is None else scale
    if max_context_len is not None:
        _check_bound(context_lens, max_context_len)
    if not _attention_backend("contiguous_decode_attention", q_, k, v):
        return reference.contiguous_decode_attention(q_, k, v, starts_, lens, scale=scale)
    bound = int(lens.max()) if max_context_len is None else max_context_len
    return triton_attention.attention(
        q_,
        k,
        v,
        block_tables=None,
        starts=starts_,
        context_lens=lens,
        query_start_loc=None,
        max_context_len=bound,
        scale=scale,
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
) -> Tensor:
    """Causal attention of packed new tokens over their paged context (§4.1, §4.4).

    Query ``j`` of sequence ``s`` sits at position ``context_lens[s] - n_new + j`` and sees
    every position up to its own; its K/V must already be in the cache.
    """
    # Prefill is not a hot loop: it reads the lengths back, so every value check runs.
    host_tables, host_lens = (x.cpu() if isinstance(x, Tensor) else x for x in (block_tables, context_lens))
    q_, k, v, tables, lens = _check_paged(q, k_cache, v_cache, host_tables, host_lens, decode=False)
    query_starts = check_index(query_start_loc, "query_start_loc", (tables.shape[0] + 1,), q_.device)
    host_starts = query_start_loc.cpu()  # one read back; host_lens is already on the CPU
    num_new = host_starts.diff()
    require(
        int(host_starts[0]) == 0 and int(host_starts[-1]) == q_.shape[0],
        "query_start_loc",
        "must run from 0 to q.shape[0] = {}",
        q_.shape[0],
    )
    require(bool((num_new >= 0).all()), "query_start_loc", "must be non-decreasing")
    require(bool((num_new <= host_lens).all()), "query_start_loc", "a sequence has more new tokens than context_lens")
    scale = q_.shape[-1] ** -0.5 if scale is None else scale
    if not _attention_backend("paged_prefill_attention", q_, k, v):
        return reference.paged_prefill_attention(q_, k, v, tables, lens, query_starts, scale=scale)
    return triton_attention.attention(
        q_,
        k,
        v,
        block_tables=tables,
        starts=None,
        context_lens=lens,
        query_start_loc=query_starts,
        max_context_len=int(host_lens.max()),
        max_query_len=int(num_new.max()),
        scale=scale,
    )


def attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, metadata: AttentionMetadata, *, scale: float | None = None
) -> Tensor:
    """Attention of one step's new tokens ``q [T, H, D]`` over their sequences' cached context.

    The engine's entry point: one call per layer for paged and contiguous caches, decode and
    prefill alike (``metadata`` says which, see ``minipaged.ops.metadata``). ``k_cache`` is the
    paged pool ``[num_blocks, block_size, H_kv, D]`` or the contiguous arena ``[num_slots, H_kv,
    D]``. The new tokens' K/V must already be written. Shapes are checked; the index values are
    not, because ``metadata`` comes from a cache, which built it valid, and reading them would
    stall the GPU once per layer.
    """
    paged = metadata.block_tables is not None
    q_, k, v = check_attention(q, k_cache, v_cache, cache_ndim=4 if paged else 3)
    require(
        metadata.is_decode or q_.shape[0] == metadata.slot_mapping.shape[0],
        "q", "has {} tokens, metadata.slot_mapping {}", q_.shape[0], metadata.slot_mapping.shape[0],
    )
    require(
        not metadata.is_decode or q_.shape[0] == metadata.num_seqs,
        "q", "has {} tokens, a decode step of {} sequences needs one each", q_.shape[0], metadata.num_seqs,
    )
    scale = q_.shape[-1] ** -0.5 if scale is None else scale
    op = "attention (" + ("paged" if paged else "contiguous") + (", decode)" if metadata.is_decode else ", prefill)")
    if _attention_backend(op, q_, k, v):
        return triton_attention.attention(
            q_,
            k,
            v,
            block_tables=metadata.block_tables,
            starts=metadata.starts,
            context_lens=metadata.context_lens,
            query_start_loc=metadata.query_start_loc,
            max_context_len=metadata.max_context_len,
            max_query_len=metadata.max_query_len,
            scale=scale,
        )
    tables = metadata.block_tables
    if not paged:
        # The arena is a pool of one-slot blocks, and a slab is the run starts[s], starts[s] + 1, ...
        k, v = k.unsqueeze(1), v.unsqueeze(1)  # [num_slots, 1, H_kv, D]
        positions = torch.arange(metadata.max_context_len, device=q_.device, dtype=torch.int32)
        tables = metadata.starts[:, None] + positions  # [S, max_context_len]
    if metadata.is_decode:
        return reference.paged_decode_attention(q_, k, v, tables, metadata.context_lens, scale=scale)
    return reference.paged_prefill_attention(
        q_, k, v, tables, metadata.context_lens, metadata.query_start_loc, scale=scale
    )
