"""Turning the scheduler's plan into tensors, running the model and the sampler (paper §5).

The one place where a step becomes GPU work. For a plan it builds, once per step:

* ``input_ids``/``positions`` ``[T]``: every scheduled sequence's new tokens, packed one
  sequence after the other (a decode step feeds one token per sequence, a prefill many);
* the attention metadata ``[T]``/``[S]``: built by the cache (``attention_metadata``), which
  alone knows whether tokens live in blocks or slabs;

then runs the transformer and keeps the logits of each sequence's last token when the step
yields its next token (the engine samples from them).

**CUDA graphs.** A small model's decode step is hundreds of tiny kernel launches: launched from
Python one by one, the GPU waits on the host. So on a GPU, decode steps are captured once per
batch size (bucketed: 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to ``max_num_seqs``) into CUDA graphs that
read their inputs from static buffers; a step copies its inputs into the buffers (padding rows:
slot -1, which ``write_to_cache`` skips, and a context of one token) and replays the graph.
The graph's kernels are sized for ``max_model_len`` tokens of context (their grid cannot change
after capture); each program stops at its sequence's real length.

**Not waiting.** Nothing in a step reads the GPU back: its inputs travel through pinned memory
(``ops.metadata.to_device``), the logits stay on the device, and a token the previous step
sampled but the host has not seen yet (``PENDING``, async scheduling in ``minipaged.engine.llm``)
is copied into the input ids on the device. So the host can plan the next step while this one
runs.

``StandInRunner`` has the same interface and runs no model: it "generates" token 0, so the
memory charts drive thousands of requests of known lengths through the same scheduler.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from minipaged.engine.scheduler import SchedulerOutput
from minipaged.engine.sequence import PENDING, PendingTokens
from minipaged.kv import KVCache
from minipaged.kv.block_allocator import blocks_needed
from minipaged.ops import AttentionMetadata
from minipaged.ops.metadata import to_device


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes decode graphs are captured for: 1, 2, 4, 8, 16, 24, 32, then every 16.

    A decode step of ``b`` sequences replays the smallest graph of at least ``b`` rows: the
    padding rows cost a little compute, far less than launching every kernel from Python.
    """
    sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, max_num_seqs, 16)]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


class ModelRunner:
    """Runs a ``minipaged.model.Llama`` over a KV cache, step by step."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, *, max_num_seqs: int, use_cuda_graphs: bool) -> None:
        self.model, self.cache = model, cache
        self.device = cache.device
        self.vocab_size = model.config.vocab_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # batch size -> (graph, its logits)
        self.last_seconds: dict[str, float] = {}
        if use_cuda_graphs:
            self._capture(max_num_seqs)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, pending: PendingTokens | None = None) -> Tensor | None:
        """Queue one step on the device; returns the logits ``[S, V]`` of the ``S`` sequences that
        sample (in the plan's order), or None when none does. The engine samples from them.

        Nothing here waits for the GPU: the step's inputs travel through pinned memory
        (``ops.metadata.to_device``), so the host can go on while earlier steps still run. A
        sequence whose last token was sampled by the step before and not yet read back
        (``PENDING``) takes it from ``pending`` on the device.

        ``last_seconds`` then holds the step's host time per phase: ``prepare`` (inputs and
        metadata) and ``forward`` (queueing the model's kernels, or replaying its graph).
        """
        if not plan.scheduled:  # nothing fits yet, or every sequence waits for its last token
            self.last_seconds = {"prepare": 0.0, "forward": 0.0}
            return None
        start = time.perf_counter()
        seq_ids, num_new, input_ids, positions, last_rows = [], [], [], [], []
        fill_at, fill_from = [], []  # input rows whose token is still on the device, and where it is
        for item in plan.scheduled:
            seq, n = item.seq, item.num_new_tokens
            seq_ids.append(seq.seq_id)
            num_new.append(n)
            input_ids += seq.token_ids[seq.num_cached - n:seq.num_cached]
            positions += range(seq.num_cached - n, seq.num_cached)
            if input_ids[-1] == PENDING:  # only a sequence's last token can be pending
                fill_at.append(len(input_ids) - 1)
                fill_from.append(pending.rows[seq.seq_id])
            if item.samples:
                last_rows.append(len(input_ids) - 1)
        metadata = self.cache.attention_metadata(seq_ids, num_new)
        ids = to_device(input_ids, torch.int64, self.device)
        if fill_at:
            at, rows = to_device(fill_at, torch.int64, self.device), to_device(fill_from, torch.int64, self.device)
            ids.index_copy_(0, at, pending.tokens.index_select(0, rows))
        pos = to_device(positions, torch.int64, self.device)
        prepared = time.perf_counter()
        if not last_rows:  # every sequence fed a middle chunk of its prompt: nothing to sample
            self.model(ids, pos, self.cache, metadata)
            logits = None
        elif plan.is_decode and self.graphs and len(seq_ids) <= max(self.graphs):
            logits = self._rows_of(self._replay(ids, pos, metadata), last_rows)  # [S, V]
        else:
            hidden = self._rows_of(self.model(ids, pos, self.cache, metadata), last_rows)  # [S, hidden]
            logits = self.model.compute_logits(hidden)  # [S, V]
        self.last_seconds = {"prepare": prepared - start, "forward": time.perf_counter() - prepared}
        return logits

    def _rows_of(self, x: Tensor, rows: list[int]) -> Tensor:
        """``x[rows]`` for increasing ``rows``; a slice when they are the first ``len(rows)`` (a
        decode step), which needs no index on the device."""
        if rows[-1] == len(rows) - 1:
            return x[: len(rows)]
        return x[to_device(rows, torch.int64, self.device)]

    @torch.inference_mode()
    def _capture(self, max_num_seqs: int) -> None:
        """Capture one decode graph per bucket, largest first, all sharing one memory pool."""
        cache, device, n = self.cache, self.device, max_num_seqs
        # A one-token sequence shows which addressing this cache hands the kernels.
        cache.allocate(-1, 1, final_len=1)
        example = cache.attention_metadata([-1], [1])
        cache.free(-1)
        width = blocks_needed(cache.max_seq_len, cache.block_size)  # blocks of the longest sequence
        self.static = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),  # -1: write nothing
            context_lens=torch.ones(n, dtype=torch.int32, device=device),
            query_start_loc=None,
            block_tables=None if example.block_tables is None else torch.zeros(n, width, dtype=torch.int32,
                                                                                device=device),
            starts=None if example.starts is None else torch.zeros(n, dtype=torch.int32, device=device),
            max_context_len=cache.max_seq_len,  # the grid must cover any length the graph will see
            max_query_len=1,
        )
        self.static_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.static_positions = torch.zeros(n, dtype=torch.int64, device=device)
        pool = None
        for batch in reversed(graph_batch_sizes(max_num_seqs)):
            metadata = _rows(self.static, batch)

            def forward(batch: int = batch, metadata: AttentionMetadata = metadata) -> Tensor:
                hidden = self.model(self.static_ids[:batch], self.static_positions[:batch], cache, metadata)
                return self.model.compute_logits(hidden)

            for _ in range(2):  # warm up: Triton compiles, the allocator settles
                forward()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = forward()
            pool = graph.pool()
            self.graphs[batch] = (graph, logits)
        torch.cuda.synchronize()

    def _replay(self, ids: Tensor, positions: Tensor, metadata: AttentionMetadata) -> Tensor:
        """Copy a decode step's inputs into the smallest graph that fits it, replay; ``[bucket, V]`` logits."""
        b = ids.shape[0]
        bucket = min(size for size in self.graphs if size >= b)
        static = self.static
        self.static_ids[:b].copy_(ids)
        self.static_positions[:b].copy_(positions)
        static.slot_mapping[:b].copy_(metadata.slot_mapping)
        static.slot_mapping[b:bucket].fill_(-1)
        static.context_lens[:b].copy_(metadata.context_lens)
        static.context_lens[b:bucket].fill_(1)
        if static.block_tables is not None:
            static.block_tables[:b, : metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        if static.starts is not None:
            static.starts[:b].copy_(metadata.starts)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits


def _rows(metadata: AttentionMetadata, batch: int) -> AttentionMetadata:
    """The first ``batch`` sequences of a decode metadata (views of its tensors)."""
    return AttentionMetadata(
        slot_mapping=metadata.slot_mapping[:batch],
        context_lens=metadata.context_lens[:batch],
        query_start_loc=None,
        block_tables=None if metadata.block_tables is None else metadata.block_tables[:batch],
        starts=None if metadata.starts is None else metadata.starts[:batch],
        max_context_len=metadata.max_context_len,
        max_query_len=1,
    )


class StandInRunner:
    """The model replaced by known output lengths: every sequence that samples gets token 0.

    With ``SamplingParams(max_tokens=output_len, ignore_eos=True)`` a request then holds exactly
    the memory a real one of those lengths would, step by step, at no cost: the memory charts
    run thousands of requests through the real scheduler and cache this way. Its "logits" are a
    vocabulary of one token, so greedy or not, the sampler draws token 0 with probability 1.
    """

    last_seconds: dict[str, float] = {}  # nothing to time

    def execute(self, plan: SchedulerOutput, pending: PendingTokens | None = None) -> Tensor | None:
        num_sampling = sum(item.samples for item in plan.scheduled)
        return torch.zeros(num_sampling, 1) if num_sampling else None
