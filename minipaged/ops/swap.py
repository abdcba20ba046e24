"""Swapping blocks between the GPU pool and a CPU pool (paper §4.5, "Swapping").

When the GPU runs out of blocks, a preempted sequence's blocks can be copied to CPU memory
and brought back later. The cost is the bus, not arithmetic, so this is not a Triton kernel:
the scattered source blocks are gathered into one contiguous staging buffer on the source
device (a torch indexing kernel), moved with a single transfer, and scattered into the
destination. A swap of many small blocks thus costs one copy over the bus instead of one per
block. This is the implementation on every device; it has no separate reference.
"""

from __future__ import annotations

import torch
from torch import Tensor


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Copy block ``block_mapping[i, 0]`` of ``src`` to block ``block_mapping[i, 1]`` of ``dst``.

    ``src`` and ``dst`` are ``[num_blocks, block_size, H_kv, D]`` caches on any two devices
    (arguments already checked, see ``minipaged.ops.checks``).
    """
    if block_mapping.numel() == 0:
        return
    sources, targets = block_mapping[:, 0], block_mapping[:, 1]
    # The CPU side of a transfer with a GPU lives in pinned (page-locked) memory: the GPU's copy
    # engine reads and writes it directly, at full bus speed. Pageable memory would go through a
    # bounce buffer at a fraction of it (on an H100, ~3 GB/s instead of ~25 GB/s).
    pinned = src.device.type != dst.device.type and "cuda" in (src.device.type, dst.device.type)
    shape = (len(sources), *src.shape[1:])
    if src.device.type == "cpu":
        staging = torch.empty(shape, dtype=src.dtype, pin_memory=pinned)
        torch.index_select(src, 0, sources.to(src.device), out=staging)
    else:
        staging = src[sources.to(src.device)]
    if dst.device.type == "cpu":
        moved = torch.empty(shape, dtype=dst.dtype, pin_memory=pinned)
        moved.copy_(staging)  # synchronous: the CPU scatter below reads it
    else:
        # Asynchronous: the scatter below runs after the copy on the same stream.
        moved = staging.to(dst.device, non_blocking=True)
    dst[targets.to(dst.device)] = moved
