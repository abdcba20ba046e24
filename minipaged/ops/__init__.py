"""Attention and cache kernels of PagedAttention (Kwon et al., SOSP 2023), §4.1 and §5.1, the
decoder layer's fused elementwise kernels (``rms_norm``, ``rotary``, ``silu_and_mul``, and
``rotary_and_write``: the model's cache write, rotary embedding included) and the sampler's
greedy pick (``greedy_sample``).

Each public function checks its arguments (``checks``), then runs a Triton kernel when the
tensors are on a GPU (or on a CPU under ``TRITON_INTERPRET=1``) and otherwise the plain-PyTorch
reference in ``minipaged.ops.reference`` (``dispatch``). Which one ran is logged at debug level
on ``minipaged.ops``. ``swap_blocks``, a transfer rather than a kernel, has one implementation
(``minipaged.ops.swap``).
"""

from minipaged.ops.dispatch import (
    attention,
    contiguous_decode_attention,
    copy_blocks,
    greedy_sample,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rotary,
    rotary_and_write,
    silu_and_mul,
    swap_blocks,
    write_to_cache,
)
from minipaged.ops.metadata import AttentionMetadata

__all__ = [
    "AttentionMetadata",
    "attention",
    "contiguous_decode_attention",
    "copy_blocks",
    "greedy_sample",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary",
    "rotary_and_write",
    "silu_and_mul",
    "swap_blocks",
    "write_to_cache",
]
