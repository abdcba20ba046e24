"""Turning the scheduler's plan into tensors, running the model and the sampler (paper §5).

The one place where a step becomes GPU work. For a plan it builds, once per step:

* ``input_ids``/``positions`` ``[T]``: every scheduled sequence's new tokens, packed one
  sequence after the other (a decode step feeds one token per sequence, a prefill many);
* the attention metadata ``[T]``/``[S]``: built by the cache (``attention_metadata``), which
  alone knows whether tokens live in blocks or slabs;

then runs the transformer and keeps the logits of each sequence's last token when the step
yields its next token (the engine samples from them).

**CUDA graphs.** A small model's step is hundreds of tiny kernel launches: launched from Python
one by one, the GPU waits on the host. So on a GPU, steps are captured into CUDA graphs that
read their inputs from static buffers; a step copies its inputs into the buffers and replays
the graph of the smallest size that holds it, padded:

* decode steps, one graph per batch size (1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to
  ``max_num_seqs``). Padding rows have slot -1 (``write_to_cache`` skips it) and a context of
  one token; the attention grid is sized for ``max_model_len`` tokens of context, and each
  program stops at its sequence's real length.
* steps with new prompt tokens (prefills, chunks, a decode batch with a newcomer's prompt), one
  graph per token count (16, 32, 64, ..., up to ``max_num_batched_tokens``, at most 8192) with
  room for as many sequences (at most ``max_num_seqs``). Padding sequences bring no new tokens
  and padding tokens belong to no sequence; the prefill kernel's grid depends only on the two
  counts (``ops.triton_attention._find_sequence``), so any step up to them fits. Even a full
  8192-token step of a small model waits on the host when launched from Python (SmolLM2-135M on
  an H200: 16-20 ms a step, for a few ms of GPU work; notes/engine.md), so with the default
  budget no step runs eagerly.

**Not waiting.** Nothing in a step reads the GPU back: its inputs travel through pinned memory
in one copy (a graph's, ``StaticInputs``; an eager step's, ``ops.metadata.to_device_many``),
the logits stay on the device, and a token the previous step sampled but the host has not seen
yet (``PENDING``, async scheduling in ``minipaged.engine.llm``) is copied into the input ids on
the device. So the host can plan the next step while this one runs.

``StandInRunner`` has the same interface and runs no model: it "generates" token 0, so the
memory charts drive thousands of requests of known lengths through the same scheduler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch
from torch import Tensor

from minipaged.engine.scheduler import SchedulerOutput
from minipaged.engine.sequence import PENDING, PendingTokens
from minipaged.kv import KVCache
from minipaged.kv.block_allocator import blocks_needed
from minipaged.ops import AttentionMetadata
from minipaged.ops.metadata import HostMetadata

MAX_GRAPH_TOKENS = 8192  # the largest step with new prompt tokens that replays a graph


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes decode graphs are captured for: 1, 2, 4, 8, 16, 24, 32, then every 16.

    A decode step of ``b`` sequences replays the smallest graph of at least ``b`` rows: the
    padding rows cost a little compute, far less than launching every kernel from Python.
    """
    sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, max_num_seqs, 16)]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


GRAPH_TOKEN_COUNTS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168)


def graph_token_counts(max_num_batched_tokens: int) -> list[int]:
    """The token counts prefill graphs are captured for: 16, 32, 64, 128, 256, 384, 512, 768, 1024,
    1536, 2048, then every 1024, and the step budget ``max_num_batched_tokens`` itself (at most
    ``MAX_GRAPH_TOKENS``). A step replays the smallest that holds it: padding costs at most half
    a step's matrix products, and at most a quarter above 4096 tokens."""
    limit = min(max_num_batched_tokens, MAX_GRAPH_TOKENS)
    return [t for t in GRAPH_TOKEN_COUNTS if t < limit] + [limit]


@dataclass(frozen=True)
class Graph:
    """A captured step: replayed for any step of at most ``num_tokens`` new tokens from at most
    ``num_seqs`` sequences (decode: one token each)."""

    graph: torch.cuda.CUDAGraph
    logits: Tensor  # [num_seqs, V]: decode, every row's; prefill, the rows of ``ModelRunner.static_rows``
    num_tokens: int
    num_seqs: int
    decode: bool


class StaticInputs:
    """What the captured graphs read, at addresses that never change: one device buffer cut into
    tensors (``tensors``: input ids, positions, the attention metadata, ...), and two pinned host
    buffers laid out the same way.

    A step writes its inputs into a host buffer through numpy views (``host``: no tensor is
    built, no memory allocated) and sends the bytes it uses in ONE copy (``send``), which is
    queued on the stream like a kernel. Where the inputs would otherwise travel in their own
    copies and then be copied into the graph's buffers one tensor at a time, that is ~10 fewer
    calls into CUDA per step, each ~10 us of host time. The two host buffers take turns, so the
    host writes one while the copy from the other may still wait in the queue; an event says
    when a buffer is free again.
    """

    def __init__(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: torch.device) -> None:
        self.offsets, total = {}, 0
        for name, (dtype, shape) in fields.items():
            self.offsets[name] = total
            total += -(-math.prod(shape) * dtype.itemsize // 16) * 16  # 16-byte aligned, as Triton likes
        self.nbytes = total
        self._buffer = torch.zeros(total, dtype=torch.uint8, device=device)
        pin = device.type == "cuda"
        self._hosts = [torch.zeros(total, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.tensors: dict[str, Tensor] = {}
        self._views: list[dict[str, np.ndarray]] = [{}, {}]
        for name, (dtype, shape) in fields.items():
            start, end = self.offsets[name], self.offsets[name] + math.prod(shape) * dtype.itemsize
            self.tensors[name] = self._buffer[start:end].view(dtype).view(shape)
            for views, host in zip(self._views, self._hosts):
                views[name] = host[start:end].view(dtype).view(shape).numpy()
        self._sent = [torch.cuda.Event(), torch.cuda.Event()] if pin else None
        self._turn = 0

    def host(self) -> dict[str, np.ndarray]:
        """Views of the next host buffer, once the copy sent from it before has run."""
        self._turn ^= 1
        if self._sent is not None:
            self._sent[self._turn].synchronize()  # two steps ago: long done
        return self._views[self._turn]

    def send(self, nbytes: int) -> None:
        """Copy the first ``nbytes`` of the host buffer just written into the device buffer."""
        self._buffer[:nbytes].copy_(self._hosts[self._turn][:nbytes], non_blocking=True)
        if self._sent is not None:
            self._sent[self._turn].record()


class ModelRunner:
    """Runs a ``minipaged.model.Llama`` over a KV cache, step by step."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        *,
        max_num_seqs: int,
        use_cuda_graphs: bool,
        max_num_batched_tokens: int = MAX_GRAPH_TOKENS,
    ) -> None:
        self.model, self.cache = model, cache
        self.device = cache.device
        self.vocab_size = model.config.vocab_size
        self.graphs: dict[int, Graph] = {}  # decode: batch size -> its graph
        self.prefill_graphs: dict[int, Graph] = {}  # new prompt tokens: token count -> its graph
        self.last_seconds: dict[str, float] = {}
        if use_cuda_graphs:
            self._capture(max_num_seqs, graph_token_counts(max_num_batched_tokens))

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, pending: PendingTokens | None = None) -> Tensor | None:
        """Queue one step on the device; returns the logits ``[S, V]`` of the ``S`` sequences that
        sample (in the plan's order), or None when none does. The engine samples from them.

        Nothing here waits for the GPU: the step's inputs travel through pinned memory in one
        copy, so the host can go on while earlier steps still run. A sequence whose last token
        was sampled by the step before and not yet read back (``PENDING``) takes it from
        ``pending`` on the device.

        ``last_seconds`` then holds the step's host time per phase: ``prepare`` (the inputs and
        the cache's metadata, on the host) and ``forward`` (sending them, then queueing the
        model's kernels or replaying its graph).
        """
        if not plan.scheduled:  # nothing fits yet, or every sequence waits for its last token
            self.last_seconds = {"prepare": 0.0, "forward": 0.0}
            return None
        start = time.perf_counter()
        scheduled = plan.scheduled
        seqs = [item.seq for item in scheduled]
        seq_ids = [seq.seq_id for seq in seqs]
        num_new = [item.num_new_tokens for item in scheduled]
        # The new tokens of every sequence, packed, and their positions (a list comprehension per
        # column, not a loop appending to five lists: this runs for every sequence of every step).
        if plan.is_decode:  # one token each, at the end of what the cache holds
            positions = [seq.num_cached - 1 for seq in seqs]
            input_ids = [seq.token_ids[p] for seq, p in zip(seqs, positions)]
        else:
            input_ids = [t for seq, n in zip(seqs, num_new) for t in seq.token_ids[seq.num_cached - n:seq.num_cached]]
            positions = [p for seq, n in zip(seqs, num_new) for p in range(seq.num_cached - n, seq.num_cached)]
        ends = list(accumulate(num_new, initial=-1))[1:]  # each sequence's last input row
        last_rows = [row for row, item in zip(ends, scheduled) if item.samples]
        # Input rows whose token is still on the device (only a sequence's last token can be
        # pending), and the rows of the previous step's tokens that hold them.
        fills = [(row, pending.rows[seq_id]) for row, seq_id in zip(ends, seq_ids) if input_ids[row] == PENDING]
        fill_at, fill_from = [row for row, _ in fills], [source for _, source in fills]
        host = self.cache.host_metadata(seq_ids, num_new)
        prepared = time.perf_counter()
        graphs, size = (self.graphs, len(seq_ids)) if plan.is_decode else (self.prefill_graphs, len(input_ids))
        graph = graphs[min(b for b in graphs if b >= size)] if graphs and size <= max(graphs) else None
        if graph is not None:
            logits = self._replay(graph, input_ids, positions, host, last_rows, fill_at, fill_from, pending)
        else:
            metadata, (ids, pos, at, rows, sampled) = host.to_device(self.device, [
                (input_ids, torch.int64), (positions, torch.int64), (fill_at, torch.int64), (fill_from, torch.int64),
                (last_rows, torch.int64)])  # fmt: skip
            if fills:
                ids.index_copy_(0, at, pending.tokens.index_select(0, rows))
            if not last_rows:  # every sequence fed a middle chunk of its prompt: nothing to sample
                self.model(ids, pos, self.cache, metadata)
                logits = None
            else:
                hidden = self._rows_of(self.model(ids, pos, self.cache, metadata), last_rows, sampled)  # [S, hidden]
                logits = self.model.compute_logits(hidden)  # [S, V]
        self.last_seconds = {"prepare": prepared - start, "forward": time.perf_counter() - prepared}
        return logits

    @staticmethod
    def _rows_of(x: Tensor, rows: list[int], rows_on_device: Tensor) -> Tensor:
        """``x[rows]`` for increasing ``rows`` (also given on the device); a slice when they are the
        first ``len(rows)`` (a decode step), which launches no gather."""
        if rows[-1] == len(rows) - 1:
            return x[: len(rows)]
        return x[rows_on_device]

    def _make_static_inputs(self, max_num_seqs: int, token_counts: list[int]) -> None:
        """The buffers every graph reads (``StaticInputs``), sized for the largest step a graph
        takes, and the static metadata viewing them."""
        cache, n = self.cache, max_num_seqs
        # A one-token sequence shows which addressing this cache hands the kernels.
        cache.allocate(-1, 1, final_len=1)
        paged = cache.host_metadata([-1], [1]).paged
        cache.free(-1)
        tokens = max(n, *token_counts)
        fields = {
            "ids": (torch.int64, (tokens,)), "positions": (torch.int64, (tokens,)),
            "slot_mapping": (torch.int64, (tokens,)), "context_lens": (torch.int32, (n,)),
            "query_start_loc": (torch.int32, (n + 1,)),
            "rows": (torch.int64, (n,)),  # the rows that sample
            "fill_at": (torch.int64, (n,)), "fill_from": (torch.int64, (n,)),  # pending tokens: where, from where
        }  # fmt: skip
        if paged:  # last: a step sends the rows of its own sequences only
            fields["block_tables"] = (torch.int32, (n, blocks_needed(cache.max_seq_len, cache.block_size)))
        else:
            fields["starts"] = (torch.int32, (n,))
        self.inputs = StaticInputs(fields, self.device)
        static = self.inputs.tensors
        # While capturing, no sequence has new tokens (every query start is 0): the kernels are
        # recorded, not their results.
        static["slot_mapping"].fill_(-1)  # -1: write nothing
        static["context_lens"].fill_(1)
        self.static = AttentionMetadata(
            slot_mapping=static["slot_mapping"],
            context_lens=static["context_lens"],
            query_start_loc=static["query_start_loc"],
            block_tables=static.get("block_tables"),
            starts=static.get("starts"),
            max_context_len=cache.max_seq_len,  # the grid must cover any length the graph will see
            max_query_len=1,
        )
        self.static_ids, self.static_positions, self.static_rows = static["ids"], static["positions"], static["rows"]

    @torch.inference_mode()
    def _capture(self, max_num_seqs: int, token_counts: list[int]) -> None:
        """Capture the prefill graphs, then the decode graphs, largest first, all sharing one
        memory pool (one replays at a time, and each keeps its logits)."""
        self._make_static_inputs(max_num_seqs, token_counts)
        cache, n, pool = self.cache, max_num_seqs, None
        sizes = [(t, min(t, n), False) for t in reversed(token_counts)]
        sizes += [(b, b, True) for b in reversed(graph_batch_sizes(n))]
        for num_tokens, num_seqs, decode in sizes:
            metadata = _first(self.static, num_tokens, num_seqs, decode)

            def forward(num_tokens: int = num_tokens, num_seqs: int = num_seqs, decode: bool = decode,
                        metadata: AttentionMetadata = metadata) -> Tensor:
                hidden = self.model(self.static_ids[:num_tokens], self.static_positions[:num_tokens], cache, metadata)
                return self.model.compute_logits(hidden if decode else hidden[self.static_rows[:num_seqs]])

            for _ in range(2):  # warm up: Triton compiles, the allocator settles
                forward()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = forward()
            pool = graph.pool()
            captured = Graph(graph, logits, num_tokens, num_seqs, decode)
            (self.graphs if decode else self.prefill_graphs)[num_seqs if decode else num_tokens] = captured
        torch.cuda.synchronize()

    def _replay(
        self, graph: Graph, input_ids: list[int], positions: list[int], host: HostMetadata, last_rows: list[int],
        fill_at: list[int], fill_from: list[int], pending: PendingTokens | None,
    ) -> Tensor | None:
        """Write a step's inputs into the static buffers, padded to the graph's size, in one copy;
        take the pending tokens; replay. The logits of the rows that sample (``last_rows``):
        ``[len(last_rows), V]``, or None when none does."""
        t, s, num_rows = len(input_ids), len(host.context_lens), len(last_rows)
        staged = self.inputs.host()
        staged["ids"][:t] = input_ids  # a PENDING id is replaced on the device, below
        staged["ids"][t : graph.num_tokens] = 0  # padding: a valid token (this buffer may hold an old PENDING)
        staged["positions"][:t] = positions
        staged["positions"][t : graph.num_tokens] = 0
        staged["slot_mapping"][:t] = host.slot_mapping
        staged["slot_mapping"][t : graph.num_tokens] = -1
        staged["context_lens"][:s] = host.context_lens
        staged["context_lens"][s : graph.num_seqs] = 1
        staged["rows"][:num_rows] = last_rows
        staged["rows"][num_rows : graph.num_seqs] = 0  # rows of an earlier, larger step
        if not graph.decode:  # padding sequences start after the last token: they have none
            staged["query_start_loc"][: s + 1] = host.query_start_loc
            staged["query_start_loc"][s + 1 : graph.num_seqs + 1] = t
        staged["fill_at"][: len(fill_at)] = fill_at
        staged["fill_from"][: len(fill_from)] = fill_from
        if host.paged:
            staged["block_tables"][:s, : host.addressing.shape[1]] = host.addressing
            nbytes = self.inputs.offsets["block_tables"] + s * staged["block_tables"][0].nbytes
        else:
            staged["starts"][:s] = host.addressing
            nbytes = self.inputs.nbytes
        self.inputs.send(nbytes)
        static = self.inputs.tensors
        if fill_at:
            at, source = static["fill_at"][: len(fill_at)], static["fill_from"][: len(fill_at)]
            self.static_ids.index_copy_(0, at, pending.tokens.index_select(0, source))
        graph.graph.replay()
        if not last_rows:
            return None
        if graph.decode:
            return self._rows_of(graph.logits, last_rows, static["rows"][:num_rows])
        return graph.logits[:num_rows]


def _first(metadata: AttentionMetadata, num_tokens: int, num_seqs: int, decode: bool) -> AttentionMetadata:
    """The static metadata of a graph: views of the first ``num_tokens`` tokens and ``num_seqs``
    sequences. The prefill kernel's tiles are picked for ``num_tokens`` new tokens of one sequence
    (``ops.triton_attention._prefill_config``): graphs of 2048 tokens and more take the
    long-prompt tiles."""
    return AttentionMetadata(
        slot_mapping=metadata.slot_mapping[:num_tokens],
        context_lens=metadata.context_lens[:num_seqs],
        query_start_loc=None if decode else metadata.query_start_loc[: num_seqs + 1],
        block_tables=None if metadata.block_tables is None else metadata.block_tables[:num_seqs],
        starts=None if metadata.starts is None else metadata.starts[:num_seqs],
        max_context_len=metadata.max_context_len,
        max_query_len=1 if decode else num_tokens,
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
