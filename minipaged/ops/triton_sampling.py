"""Greedy decoding's last step in one kernel: the most likely token of each row of logits, and its
log-probability.

In PyTorch that step is four kernels over the whole ``[B, V]`` logits: a cast to float32 (a
float32 copy of them), ``log_softmax`` (another), ``argmax``, and a ``gather`` of the chosen
token's log-probability. At a decode step of 256 sequences over SmolLM2's 49,152-token
vocabulary they take ~105 us of an H200's ~1.4 ms step, for 25 MB of bfloat16 logits that the
memory could read in ~6 us. This kernel takes ~13 us there (notes/engine.md, stop 25).

Here one program per row reads its logits once, in chunks of ``BLOCK``, in their own dtype, and
keeps three running values in float32: the largest logit so far, its index, and the sum of
``exp(logit - largest)`` (the online softmax's denominator, rescaled whenever the largest grows,
as in FlashAttention). The chosen token's log-probability is then
``logit - largest - log(sum) = -log(sum)``: its logit is the largest.

Ties go to the lowest index, as ``torch.argmax`` breaks them: within a chunk ``tl.argmax`` keeps
the first, and a later chunk wins only with a strictly larger logit. The sum runs in another
order than PyTorch's, so a log-probability may differ in the last float32 bits; the token never,
for logits that are numbers (``-inf`` included: a row of only ``-inf`` gives token 0 and a NaN
log-probability, as the reference does). A NaN logit has no rank: ``torch.argmax`` returns the
first NaN, and the kernel's token is then unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from minipaged.ops.launch import launch, next_power_of_2


@triton.jit
def _greedy_kernel(logits_ptr, tokens_ptr, logprobs_ptr, stride_row, vocab_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_row
    cols = tl.arange(0, BLOCK)
    largest = tl.full([], float("-inf"), tl.float32)
    index = tl.zeros([], tl.int32)
    total = tl.zeros([], tl.float32)  # sum of exp(logit - largest) over the chunks read so far
    for start in range(0, vocab_size, BLOCK):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < vocab_size, other=float("-inf")).to(tl.float32)
        chunk_largest = tl.max(x, axis=0)
        chunk_index = tl.argmax(x, axis=0)  # the first of equal maxima
        new_largest = tl.maximum(largest, chunk_largest)
        # (while every logit so far is -inf, shift by 0: no -inf - -inf)
        shift = tl.where(new_largest == float("-inf"), 0.0, new_largest)
        total = total * tl.exp(largest - shift) + tl.sum(tl.exp(x - shift), axis=0)
        index = tl.where(chunk_largest > largest, start + chunk_index, index)
        largest = new_largest
    tl.store(tokens_ptr + row, index.to(tl.int64))
    tl.store(logprobs_ptr + row, tl.where(total > 0, -tl.log(total), float("nan")))  # all -inf: no distribution


def greedy_sample(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of ``reference.greedy_sample`` (arguments already checked, see ``checks``).
    The rows may be strided; each row's entries must be contiguous."""
    num_rows, vocab_size = logits.shape
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows:
        # 8192 logits a chunk on 8 warps: within 10% of the best of 4 to 16 warps and 2K to 16K
        # chunks on an H200 at 256 rows of 49K and 128K logits, ~25% over it at 1-64 rows (where
        # 16K chunks win, at ~7 us against ~9: notes/engine.md).
        block = min(8192, next_power_of_2(vocab_size))
        launch(
            _greedy_kernel, (num_rows,), (logits, tokens, logprobs, logits.stride(0), vocab_size),
            BLOCK=block, num_warps=max(1, min(8, block // 512)),
        )  # fmt: skip
    return tokens, logprobs
