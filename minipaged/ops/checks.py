"""Argument checks shared by the public ops: every error is a ``ValueError`` naming the argument.

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

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def require(condition: bool, name: str, message: str, *args: object) -> None:
    """Raise ``ValueError("name: message")``; the message is formatted only on failure (hot path)."""
    if not condition:
        raise ValueError(f"{name}: " + message.format(*args))


def check_tensor(tensor: object, name: str, ndim: int, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    require(isinstance(tensor, Tensor), name, "expected a torch.Tensor, got {}", type(tensor).__name__)
    assert isinstance(tensor, Tensor)
    require(tensor.dim() == ndim, name, "expected {} dimensions, got shape {}", ndim, tuple(tensor.shape))
    require(tensor.dtype in dtypes, name, "dtype {} not in {}", tensor.dtype, dtypes)
    return tensor


def check_same(tensor: Tensor, name: str, like: Tensor, like_name: str) -> None:
    """``tensor`` must have the dtype and device of ``like``."""
    require(tensor.device == like.device, name, "on {}, but {} is on {}", tensor.device, like_name, like.device)
    require(tensor.dtype == like.dtype, name, "dtype {} differs from {}'s {}", tensor.dtype, like_name, like.dtype)


def check_index(tensor: object, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """An integer index tensor of exactly ``shape`` (-1 = any size), moved to ``device``."""
    index = check_tensor(tensor, name, len(shape), INDEX_DTYPES)
    ok = all(want in (-1, got) for want, got in zip(shape, index.shape, strict=True))
    require(ok, name, "expected shape {}, got {}", shape, tuple(index.shape))
    require(index.device.type == "cpu" or index.device == device, name, "on {}, data is on {}", index.device, device)
    return index.to(device).contiguous()


def on_host(*tensors: Tensor) -> bool:
    """Whether the caller's tensors are all on the CPU, so reading their values costs no GPU sync."""
    return all(t.device.type == "cpu" for t in tensors)


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
    require(v.shape == k.shape, names[1], "shape {} differs from {}'s {}", tuple(v.shape), names[0], tuple(k.shape))
    check_same(v, names[1], k, names[0])
    return k, v


def check_attention(
    q: object, k_cache: object, v_cache: object, cache_ndim: int, query_ndim: int = 3
) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes shared by every attention op: q ``[..., H, D]``, caches ``[..., H_kv, D]``."""
    q_ = check_tensor(q, "q", query_ndim, FLOAT_DTYPES)
    names = ("k_cache", "v_cache") if cache_ndim == 4 else ("k_arena", "v_arena")
    k, v = check_cache_pair(k_cache, v_cache, cache_ndim, names)
    check_same(k, names[0], q_, "q")
    heads, head_dim = q_.shape[-2:]
    kv_heads = k.shape[-2]
    require(head_dim > 0 and heads > 0, "q", "needs at least one head of dimension >= 1, got shape {}", tuple(q_.shape))
    require(kv_heads > 0, names[0], "needs at least one KV head, got shape {}", tuple(k.shape))
    require(k.shape[-1] == head_dim, names[0], "head_dim {} differs from q's {}", k.shape[-1], head_dim)
    require(heads % kv_heads == 0, "q", "{} query heads is not a multiple of {} KV heads", heads, kv_heads)
    if cache_ndim == 4:
        block_size = k.shape[1]
        require(
            block_size > 0 and block_size & (block_size - 1) == 0,
            names[0],
            "block_size {} is not a power of two",
            block_size,
        )
    return q_, k, v
