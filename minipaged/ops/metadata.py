"""The one handoff from a KV cache to the attention kernels (paper §4.1, §5.1).

A forward step of the model runs a batch of sequences, each bringing some *new* tokens (a
whole prompt, a chunk of one, or the single token of a decode step). Before the step, the
cache makes room for them; then it describes, once for the whole step, where every token's
K/V lives. Every layer reuses that description: it writes its new K/V to ``slot_mapping`` and
attends through ``block_tables`` (paged) or ``starts`` (contiguous).

The two caches differ in exactly one field, which is ``None`` in the other mode:

* paged: ``block_tables[s, i]`` is the physical block holding logical block ``i`` of sequence
  ``s``: token ``p`` lives at slot ``block_tables[s, p // B] * B + p % B``;
* contiguous: token ``p`` lives at slot ``starts[s] + p``.

So the engine never asks which cache it holds: it passes this object to ``ops.attention``.

The cache builds it on the host as numpy arrays (``HostMetadata``) and sends them with
``to_device_many`` (one copy for all of them), which does not wait for the GPU: the engine
prepares one step while the GPU still runs the one before (``minipaged.engine.llm``). A runner
that replays CUDA graphs writes the host arrays straight into its graphs' input buffers instead.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_TYPECODES = {torch.int32: "i", torch.int64: "q", torch.float64: "d"}  # array.array's names for them
_NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.float64: np.float64}


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` for a flat list of numbers, without
    waiting for the GPU (see ``to_device_many``)."""
    return to_device_many([(values, dtype)], device)[0]


def to_device_many(columns: list[tuple[list | np.ndarray, torch.dtype]], device: torch.device) -> list[Tensor]:
    """Lists or numpy arrays of numbers ``[(values, dtype), ...]`` as flat tensors on ``device``,
    in ONE copy, without waiting for the GPU.

    Copying a plain CPU tensor to the GPU first waits for every kernel already queued on the
    stream (the copy is synchronous for pageable memory). Staged through pinned memory, the copy
    is queued like a kernel instead and the host goes on at once; PyTorch keeps the pinned buffer
    alive until the copy has run. Each such copy costs ~50 us of host time on an H100's host
    (a pinned allocation, the copy call, an event), so a step sends all its index lists in one:
    they are packed into one byte buffer, each at a multiple of 16 bytes, copied, and handed back
    as typed views of the device buffer. A list becomes bytes through ``array.array``, three
    times faster than ``torch.tensor`` on a list of a few thousand integers.
    """
    packed = [
        values.astype(_NUMPY[dtype], copy=False).tobytes() if isinstance(values, np.ndarray)
        else array(_TYPECODES[dtype], values).tobytes()
        for values, dtype in columns
    ]
    offsets, total = [], 0
    for data in packed:
        offsets.append(total)
        total += -(-len(data) // 16) * 16  # Triton specialises on 16-byte alignment
    buffer = bytearray(total)
    for data, offset in zip(packed, offsets):
        buffer[offset : offset + len(data)] = data
    host = torch.frombuffer(buffer, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
    moved = host.to(device) if device.type != "cuda" else host.pin_memory().to(device, non_blocking=True)
    return [
        moved[offset : offset + len(data)].view(dtype) for data, offset, (_, dtype) in zip(packed, offsets, columns)
    ]


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one step's tokens go and where every sequence's context is, for ``S`` sequences
    and ``T`` new tokens in all (packed sequence after sequence)."""

    slot_mapping: Tensor  # int64 [T]: the slot each new token's K/V is written to
    context_lens: Tensor  # int32 [S]: tokens of each sequence in the cache, this step's included
    query_start_loc: Tensor | None  # int32 [S + 1]: sequence s's new tokens are [q[s], q[s+1]); None: one each (decode)
    block_tables: Tensor | None  # int32 [S, max_blocks]: paged; None for the contiguous cache
    starts: Tensor | None  # int32 [S]: first slot of each slab: contiguous; None for the paged cache
    max_context_len: int  # max(context_lens), known on the host (sizes the kernel's grid without a GPU sync)
    max_query_len: int  # the most new tokens of one sequence (1 in decode)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        return self.query_start_loc is None


@dataclass(frozen=True)
class HostMetadata:
    """``AttentionMetadata`` before it travels: the same facts as numpy arrays on the host, as the
    cache builds them (``KVCache.host_metadata``). ``to_device`` sends them in one copy; a runner
    that replays CUDA graphs writes them straight into its graphs' input buffers instead."""

    slot_mapping: np.ndarray  # int64 [T]
    context_lens: np.ndarray  # [S]
    query_start_loc: np.ndarray | None  # [S + 1]; None: one new token each (decode)
    addressing: np.ndarray  # int32: the block tables [S, max_blocks] (paged) or the slab starts [S] (contiguous)
    max_context_len: int
    max_query_len: int

    @property
    def paged(self) -> bool:
        return self.addressing.ndim == 2

    def to_device(
        self, device: torch.device, extra: list[tuple[list | np.ndarray, torch.dtype]] = ()
    ) -> tuple[AttentionMetadata, list[Tensor]]:
        """The ``AttentionMetadata`` on ``device``, and the ``extra`` columns (the caller's own
        inputs of the step), all in one copy (``to_device_many``)."""
        decode = self.query_start_loc is None
        slot_mapping, lens, addressing, query_starts, *rest = to_device_many(
            [(self.slot_mapping, torch.int64), (self.context_lens, torch.int32), (self.addressing, torch.int32),
             ([] if decode else self.query_start_loc, torch.int32), *extra], device)  # fmt: skip
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            context_lens=lens,
            query_start_loc=None if decode else query_starts,
            block_tables=addressing.view(self.addressing.shape) if self.paged else None,
            starts=None if self.paged else addressing,
            max_context_len=self.max_context_len,
            max_query_len=self.max_query_len,
        )
        return metadata, rest
