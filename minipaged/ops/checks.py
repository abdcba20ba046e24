"""Every argument check of ``minipaged.ops``: each error is a ``ValueError`` naming the argument.

The public functions in ``dispatch`` call ``check_<name of the op>`` first, once; what runs
after it (the kernels, the references) trusts its arguments and asserts at most.

Index tensors (slot mappings, block tables, lengths) may live on the CPU while the data is on
a GPU; the checks move them to the data's device and make them contiguous (the kernels index
them densely). Data tensors must share one device.

Shapes, dtypes and devices are always checked. *Values* (lengths >= 1, block numbers and slots
inside the pool) are checked only when the caller passes the index tensor on the CPU: reading a
GPU tensor would make the host wait for the GPU in the hot path. An engine that keeps its index
tensors on the GPU must keep them valid itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minipaged.ops.metadata import AttentionMetadata

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def require(condition: bool, name: str, message: str, *args: object) -> None:
    """Raise ``ValueError("name: message")``; the message is formatted only on failure (hot path)."""
    if not condition:
        raise ValueError(f"{name}: " + message.format(*args))


# -- building blocks -------------------------------------------------------------------------


def check_tensor(tensor: object, name: str, ndim: int, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if isinstance(tensor, Tensor) and tensor.dim() == ndim and tensor.dtype in dtypes:
        return tensor  # the common case, with no message built (a decode call runs ~10 of these)
    require(isinstance(tensor, Tensor), name, "expected a torch.Tensor, got {}", type(tensor).__name__)
    assert isinstance(tensor, Tensor)
    require(tensor.dim() == ndim, name, "expected {} dimensions, got shape {}", ndim, tuple(tensor.shape))
    require(tensor.dtype in dtypes, name, "dtype {} not in {}", tensor.dtype, dtypes)
    return tensor


def check_same(tensor: Tensor, name: str, like: Tensor, like_name: str) -> None:
    """``tensor`` must have the dtype and device of ``like``."""
    if tensor.dtype == like.dtype and tensor.device == like.device:
        return
    require(tensor.device == like.device, name, "on {}, but {} is on {}", tensor.device, like_name, like.device)
    require(tensor.dtype == like.dtype, name, "dtype {} differs from {}'s {}", tensor.dtype, like_name, like.dtype)


def check_index(tensor: object, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """An integer index tensor of exactly ``shape`` (-1 = any size), moved to ``device``."""
    index = check_tensor(tensor, name, len(shape), INDEX_DTYPES)
    for want, got in zip(shape, index.shape):  # a loop, not all(...): this runs on every call
        if want != -1 and want != got:
            require(False, name, "expected shape {}, got {}", shape, tuple(index.shape))
    if index.device == device:
        return index if index.is_contiguous() else index.contiguous()
    require(index.device.type == "cpu", name, "on {}, data is on {}", index.device, device)
    return index.to(device).contiguous()


def on_host(*tensors: Tensor) -> bool:
    """Whether the caller's tensors are all on the CPU, so reading their values costs no GPU sync."""
    return all(t.is_cpu for t in tensors)


def check_range(values: Tensor, name: str, limit: int, what: str, allow_minus_one: bool = False) -> None:
    """Every entry in ``[0, limit)`` (or -1 when allowed): out-of-range indices would read or
    write outside the pool."""
    ok = (values >= 0) & (values < limit)
    if allow_minus_one:
        ok |= values == -1
    require(bool(ok.all()), name, "entries must be {} in [0, {}){}", what, limit, " or -1" if allow_minus_one else "")


def check_cache_pair(k_cache: object, v_cache: object, ndim: int, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    k = check_tensor(k_cache, names[0], ndim, FLOAT_DTYPES)
    v = check_tensor(v_cache, names[1], ndim, FLOAT_DTYPES)
    if v.shape != k.shape:
        require(False, names[1], "shape {} differs from {}'s {}", tuple(v.shape), names[0], tuple(k.shape))
    check_same(v, names[1], k, names[0])
    return k, v


def check_qkv(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_ndim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes shared by every attention op: q ``[T, H, D]``, caches ``[..., H_kv, D]`` (4-D: paged).
    The kernels read a head of q as one contiguous row: a q strided in its head dimension comes
    back as a contiguous copy (any other strides are read as they are)."""
    q_ = check_tensor(q, "q", 3, FLOAT_DTYPES)
    if q_.stride(-1) != 1:
        q_ = q_.contiguous()
    names = ("k_cache", "v_cache") if cache_ndim == 4 else ("k_arena", "v_arena")
    k, v = check_cache_pair(k_cache, v_cache, cache_ndim, names)
    check_same(k, names[0], q_, "q")
    _, heads, head_dim = q_.shape
    k_shape = k.shape  # each ``.shape`` builds a new torch.Size: read it once
    kv_heads, kv_head_dim = k_shape[-2], k_shape[-1]
    block_size = k_shape[1] if cache_ndim == 4 else 1
    fine = (
        head_dim > 0 and heads > 0 and kv_heads > 0 and kv_head_dim == head_dim and heads % kv_heads == 0
        and block_size > 0 and block_size & (block_size - 1) == 0
    )  # fmt: skip
    if fine:
        return q_, k, v
    require(head_dim > 0 and heads > 0, "q", "needs at least one head of dimension >= 1, got shape {}", tuple(q_.shape))
    require(kv_heads > 0, names[0], "needs at least one KV head, got shape {}", tuple(k.shape))
    require(kv_head_dim == head_dim, names[0], "head_dim {} differs from q's {}", kv_head_dim, head_dim)
    require(heads % kv_heads == 0, "q", "{} query heads is not a multiple of {} KV heads", heads, kv_heads)
    require(False, names[0], "block_size {} is not a power of two", block_size)
    return q_, k, v


def _check_lengths(context_lens: Tensor, num_seqs: int, device: torch.device) -> Tensor:
    """Shape always; values when the caller's tensor is on the CPU."""
    lens = check_index(context_lens, "context_lens", (num_seqs,), device)
    if on_host(context_lens):
        require(bool((context_lens >= 1).all()), "context_lens", "every sequence needs at least one token")
    return lens


def _check_bound(context_lens: Tensor, max_context_len: int | None) -> None:
    """``max_context_len`` (when given) sizes the split-K grid: it must bound every length."""
    if max_context_len is None:
        return
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
    """What paged decode and prefill share; in decode, ``q`` has one row per sequence."""
    q_, k, v = check_qkv(q, k_cache, v_cache, cache_ndim=4)
    num_seqs = q_.shape[0] if decode else -1
    tables = check_index(block_tables, "block_tables", (num_seqs, -1), q_.device)
    lens = _check_lengths(context_lens, tables.shape[0], q_.device)
    require(tables.shape[1] > 0, "block_tables", "needs at least one column, got shape {}", tuple(tables.shape))
    if on_host(context_lens):
        block_size = k.shape[1]
        capacity = tables.shape[1] * block_size
        require(
            bool((context_lens <= capacity).all()),
            "context_lens",
            "longer than block_tables can hold ({} tokens)",
            capacity,
        )
        if on_host(block_tables):  # only the entries a sequence uses must name real blocks
            blocks_used = (context_lens + block_size - 1) // block_size
            used = torch.arange(tables.shape[1]) < blocks_used[:, None]
            check_range(block_tables[used], "block_tables", k.shape[0], "block numbers")
    return q_, k, v, tables, lens


# -- one check per public op, named after it ---------------------------------------------------


def check_write_to_cache(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``key, value, k_cache, v_cache`` and the slots on the cache's device."""
    key_, value_ = check_cache_pair(key, value, 3, ("key", "value"))
    k, v = check_cache_pair(k_cache, v_cache, 4, ("k_cache", "v_cache"))
    require(key_.device == k.device, "key", "on {}, but k_cache is on {}", key_.device, k.device)
    rows, cache_rows = tuple(key_.shape[1:]), tuple(k.shape[2:])  # [H_kv, D] per token
    require(rows == cache_rows, "key", "rows {} differ from k_cache's {}", rows, cache_rows)
    slots = check_index(slot_mapping, "slot_mapping", (key_.shape[0],), k.device)
    if on_host(slot_mapping):
        check_range(slot_mapping, "slot_mapping", k.shape[0] * k.shape[1], "slots", allow_minus_one=True)
    return key_, value_, k, v, slots


def check_copy_blocks(k_caches: list[Tensor], v_caches: list[Tensor], block_mapping: Tensor) -> Tensor | None:
    """Returns the mapping on the caches' device, or None when there are no layers (nothing to copy)."""
    require(len(k_caches) == len(v_caches), "v_caches", "{} layers, k_caches has {}", len(v_caches), len(k_caches))
    for layer, (k, v) in enumerate(zip(k_caches, v_caches, strict=True)):
        check_cache_pair(k, v, 4, (f"k_caches[{layer}]", f"v_caches[{layer}]"))
    if not k_caches:
        return None
    mapping = check_index(block_mapping, "block_mapping", (-1, 2), k_caches[0].device)
    if on_host(block_mapping):
        check_range(block_mapping, "block_mapping", k_caches[0].shape[0], "blocks")
    return mapping


def check_swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``src, dst`` and the mapping on the CPU (a swap reads it there anyway, so every
    value is checked)."""
    src_ = check_tensor(src, "src", 4, FLOAT_DTYPES)
    dst_ = check_tensor(dst, "dst", 4, FLOAT_DTYPES)
    dst_block, src_block = tuple(dst_.shape[1:]), tuple(src_.shape[1:])  # [block_size, H_kv, D]
    require(dst_block == src_block, "dst", "blocks of shape {}, src has {}", dst_block, src_block)
    require(dst_.dtype == src_.dtype, "dst", "dtype {} differs from src's {}", dst_.dtype, src_.dtype)
    device = block_mapping.device if isinstance(block_mapping, Tensor) else torch.device("cpu")
    mapping = check_index(block_mapping, "block_mapping", (-1, 2), device).cpu()
    check_range(mapping[:, 0], "block_mapping", src_.shape[0], "source blocks of src")
    check_range(mapping[:, 1], "block_mapping", dst_.shape[0], "destination blocks of dst")
    return src_, dst_, mapping


def check_paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, max_context_len: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``q, k_cache, v_cache``, the tables and the lengths on the data's device."""
    checked = _check_paged(q, k_cache, v_cache, block_tables, context_lens, decode=True)
    _check_bound(context_lens, max_context_len)
    return checked


def check_contiguous_decode_attention(
    q: Tensor, k_arena: Tensor, v_arena: Tensor, starts: Tensor, context_lens: Tensor, max_context_len: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``q, k_arena, v_arena``, the starts and the lengths on the data's device."""
    q_, k, v = check_qkv(q, k_arena, v_arena, cache_ndim=3)
    starts_ = check_index(starts, "starts", (q_.shape[0],), q_.device)
    lens = _check_lengths(context_lens, q_.shape[0], q_.device)
    if on_host(starts, context_lens):
        inside = bool((starts >= 0).all() and (starts + context_lens <= k.shape[0]).all())
        require(inside, "starts", "a slab reaches outside the arena")
    _check_bound(context_lens, max_context_len)
    return q_, k, v, starts_, lens


def check_paged_prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    query_start_loc: Tensor,
    max_context_len: int | None = None,
    max_query_len: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int]:
    """Returns ``q, k_cache, v_cache``, the tables, lengths and query starts on the data's device,
    then the longest context and the most new tokens of one sequence (the kernel's grid).

    Without the two bounds, the index tensors are read back once (a GPU sync) to find them, and
    every value check runs. With both bounds nothing is read back, as in decode: values are
    checked only when the caller passes the index tensors on the CPU.
    """
    require(
        (max_context_len is None) == (max_query_len is None),
        "max_query_len", "give max_context_len and max_query_len together, or neither",
    )  # fmt: skip
    read_back = max_context_len is None
    indices = (block_tables, context_lens, query_start_loc)
    host = [x.cpu() if read_back and isinstance(x, Tensor) else x for x in indices]
    q_, k, v, _, _ = _check_paged(q, k_cache, v_cache, host[0], host[1], decode=False)
    # The kernel gets the caller's tensors (a read-back copy would travel back to the GPU).
    tables = check_index(block_tables, "block_tables", (-1, -1), q_.device)
    lens = check_index(context_lens, "context_lens", (tables.shape[0],), q_.device)
    query_starts = check_index(query_start_loc, "query_start_loc", (tables.shape[0] + 1,), q_.device)
    host_lens, host_starts = host[1], host[2]
    if not on_host(host_lens, host_starts):
        require(max_context_len >= 1, "max_context_len", "must be >= 1, got {}", max_context_len)
        require(max_query_len >= 1, "max_query_len", "must be >= 1, got {}", max_query_len)
        return q_, k, v, tables, lens, query_starts, max_context_len, max_query_len
    num_new = host_starts.diff()
    require(
        int(host_starts[0]) == 0 and int(host_starts[-1]) == q_.shape[0],
        "query_start_loc",
        "must run from 0 to q.shape[0] = {}",
        q_.shape[0],
    )
    require(bool((num_new >= 0).all()), "query_start_loc", "must be non-decreasing")
    require(bool((num_new <= host_lens).all()), "query_start_loc", "a sequence has more new tokens than context_lens")
    longest, most_new = int(host_lens.max()), int(num_new.max())
    if read_back:
        return q_, k, v, tables, lens, query_starts, longest, most_new
    require(longest <= max_context_len, "max_context_len", "{} is below a context length ({})",
            max_context_len, longest)  # fmt: skip
    require(most_new <= max_query_len, "max_query_len", "{} is below a sequence's new tokens ({})",
            max_query_len, most_new)  # fmt: skip
    return q_, k, v, tables, lens, query_starts, max_context_len, max_query_len


def check_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, metadata: AttentionMetadata
) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes only: ``metadata`` comes from a cache, which built its index values valid, and
    reading them would stall the GPU once per layer (and break CUDA-graph capture)."""
    q_, k, v = check_qkv(q, k_cache, v_cache, cache_ndim=4 if metadata.block_tables is not None else 3)
    require(
        metadata.is_decode or q_.shape[0] == metadata.slot_mapping.shape[0],
        "q", "has {} tokens, metadata.slot_mapping {}", q_.shape[0], metadata.slot_mapping.shape[0],
    )  # fmt: skip
    require(
        not metadata.is_decode or q_.shape[0] == metadata.num_seqs,
        "q", "has {} tokens, a decode step of {} sequences needs one each", q_.shape[0], metadata.num_seqs,
    )  # fmt: skip
    return q_, k, v


# -- the decoder layer's elementwise ops: shapes, dtypes, devices --------------------------------


def check_rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns ``x, weight, residual``; the weight (and the residual) must have x's dtype and device."""
    x_ = check_tensor(x, "x", 2, FLOAT_DTYPES)
    require(x_.shape[1] > 0, "x", "needs a hidden size >= 1, got shape {}", tuple(x_.shape))
    weight_ = check_tensor(weight, "weight", 1, FLOAT_DTYPES)
    hidden = x_.shape[1]
    require(weight_.shape[0] == hidden, "weight", "has {} entries, x's hidden size is {}", weight_.shape[0], hidden)
    check_same(weight_, "weight", x_, "x")
    require(eps >= 0, "eps", "must be >= 0, got {}", eps)
    if residual is None:
        return x_, weight_, None
    residual_ = check_tensor(residual, "residual", 2, FLOAT_DTYPES)
    shape = tuple(residual_.shape)
    require(shape == tuple(x_.shape), "residual", "shape {} differs from x's {}", shape, tuple(x_.shape))
    check_same(residual_, "residual", x_, "x")
    return x_, weight_, residual_


def check_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, k_name: str = "k"
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``q, k, cos, sin`` and the positions on the data's device. The positions' values
    (rows of the tables) are checked when the caller passes them on the CPU. ``k_name``: what the
    caller calls ``k``, for the messages."""
    q_ = check_tensor(q, "q", 3, FLOAT_DTYPES)
    k_ = check_tensor(k, k_name, 3, FLOAT_DTYPES)
    check_same(k_, k_name, q_, "q")
    num_tokens, head_dim = q_.shape[0], q_.shape[2]
    require(head_dim > 0 and head_dim % 2 == 0, "q", "head_dim must be even (i pairs with i + D/2), got shape {}",
            tuple(q_.shape))  # fmt: skip
    require(k_.shape[0] == num_tokens and k_.shape[2] == head_dim, k_name, "shape {} does not match q's {}",
            tuple(k_.shape), tuple(q_.shape))  # fmt: skip
    cos_ = check_tensor(cos, "cos", 2, (torch.float32,))
    require(cos_.shape[1] == head_dim // 2, "cos", "expected head_dim / 2 = {} columns, got shape {}",
            head_dim // 2, tuple(cos_.shape))  # fmt: skip
    require(cos_.device == q_.device, "cos", "on {}, but q is on {}", cos_.device, q_.device)
    sin_ = check_tensor(sin, "sin", 2, (torch.float32,))
    require(sin_.shape == cos_.shape, "sin", "shape {} differs from cos's {}", tuple(sin_.shape), tuple(cos_.shape))
    check_same(sin_, "sin", cos_, "cos")
    positions_ = check_index(positions, "positions", (num_tokens,), q_.device)
    if on_host(positions):
        check_range(positions, "positions", cos_.shape[0], "rows of cos")
    return q_, k_, cos_, sin_, positions_


def check_rotary_and_write(
    q: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``check_rotary`` of q and the keys, then ``check_write_to_cache`` of the keys and values:
    returns the arguments in order, the positions and slots on the data's device."""
    q_, key_, cos_, sin_, positions_ = check_rotary(q, key, cos, sin, positions, "key")
    key_, value_, k, v, slots = check_write_to_cache(key_, value, k_cache, v_cache, slot_mapping)
    return q_, key_, value_, cos_, sin_, positions_, k, v, slots


def check_silu_and_mul(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    gate_ = check_tensor(gate, "gate", 2, FLOAT_DTYPES)
    up_ = check_tensor(up, "up", 2, FLOAT_DTYPES)
    require(up_.shape == gate_.shape, "up", "shape {} differs from gate's {}", tuple(up_.shape), tuple(gate_.shape))
    check_same(up_, "up", gate_, "gate")
    return gate_, up_


def check_greedy_sample(logits: Tensor) -> Tensor:
    logits_ = check_tensor(logits, "logits", 2, FLOAT_DTYPES)
    require(logits_.shape[1] > 0, "logits", "needs a vocabulary of >= 1 token, got shape {}", tuple(logits_.shape))
    return logits_
