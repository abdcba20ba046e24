"""Swapping blocks between the GPU pool and a CPU pool (paper §4.5, "Swapping").

When the GPU runs out of blocks, a preempted sequence's blocks can be copied to CPU memory
and brought back later. The cost is the bus, not arithmetic, so this is not a Triton kernel:
the scattered source blocks are gathered into one contiguous staging buffer on the source
device (a torch indexing kernel), moved with a single transfer, and scattered into the
destination. A swap of many small blocks thus costs one copy over the bus instead of one per
block. This is the implementation on every device; it has no separate reference.
"""

from __future__ import annotations

from torch import Tensor


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Copy block ``block_mapping[i, 0]`` of ``src`` to block ``block_mapping[i, 1]`` of ``dst``.

    ``src`` and ``dst`` are ``[num_blocks, block_size, H_kv, D]`` caches on any two devices
    (arguments already checked, see ``minipaged.ops.checks``).
    """
    if block_mapping.numel() == 0:
        return
    staging = src[block_mapping[:, 0].to(src.device)]
    # Asynchronous only towards a GPU, where the scatter below is ordered after the copy on the
    # stream; a copy to the CPU must finish before the CPU scatter reads it.
    moved = staging.to(dst.device, non_blocking=dst.device.type == "cuda")
    dst[block_mapping[:, 1].to(dst.device)] = moved
