"""The memory charts' serving loop: the engine's own scheduler over a real KV cache, with the
model replaced by known output lengths (paper §4.5 scheduling, §6.1 baselines).

There is one scheduler (``minipaged.engine.scheduler``): the engine runs it with a transformer,
the charts with ``StandInRunner``, which "generates" a token for every request that samples, so
a request of prompt P and output O (``max_tokens=O``, EOS ignored) holds exactly the memory a
real one would. Time advances in *steps* (iterations of the model). One step:

1. Requests whose arrival time has come join the back of the waiting queue (time of step
   k = k * step_duration seconds; the step duration is the one mapping from steps to seconds).
2. The scheduler plans the step: every running request grows by one token (``append_slots``),
   preempting the newest running request when the cache has no room, then waiting requests are
   admitted first come, first served while they fit (``can_allocate``); nothing overtakes the
   head. The charts give the step no token budget (no chunked prefill) and no admission
   watermark.
3. The cache's memory breakdown is sampled (``memory_breakdown(next_request=head of the waiting
   queue)``) with the numbers of running and waiting requests: the state while the step's model
   pass runs. A request admitted in this step counts with its prompt only, so a request is
   sampled holding P, P+1, ..., P+O-1 tokens: it runs for O steps. Its last token is sampled
   but never fed back, so its K/V is never stored; the request leaves at the end of that step.

The contiguous cache reserves each request's slab up front, so a running request can always
grow. The paged cache allocates a block only when the previous one is full, so a running
request can find no free block; then, as vLLM does (§4.5, recomputation), the most recently
admitted running request is preempted: its blocks are freed and it goes back to the FRONT of
the waiting queue, to be prefilled again later from every token it had (prompt + generated).

The cache tensors are tiny (one layer, one head of dimension one) so a run is pure bookkeeping:
thousands of requests take seconds on a CPU.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from minipaged.engine import LLMEngine, SamplingParams, StandInRunner
from minipaged.experiments.paper import DEFAULT_BLOCK_SIZE, STEP_DURATION
from minipaged.kv import ContiguousKVCache, KVCache, MemoryBreakdown, PagedKVCache
from minipaged.workloads import MAX_SEQ_LEN, Request

SYSTEMS = ("contiguous-max", "contiguous-pow2", "contiguous-oracle", "paged")
CATEGORIES = tuple(f.name for f in fields(MemoryBreakdown))


def make_cache(
    system: str, num_slots: int, max_seq_len: int = MAX_SEQ_LEN, block_size: int = DEFAULT_BLOCK_SIZE
) -> KVCache:
    """A cache of about `num_slots` token slots for one of SYSTEMS (the paged cache gets
    num_slots // block_size blocks)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"the block size (--block-size) must be a positive integer, got {block_size!r}")
    if system == "paged":
        if num_slots < block_size:
            raise ValueError(f"--kv-slots ({num_slots}) must hold at least one block of {block_size} slots")
        return PagedKVCache(num_slots // block_size, block_size, max_seq_len=max_seq_len)
    if system.startswith("contiguous-"):
        return ContiguousKVCache(num_slots, system.removeprefix("contiguous-"), max_seq_len=max_seq_len)
    raise ValueError(f"unknown system {system!r}; allowed: {', '.join(SYSTEMS)}")


@dataclass
class ServeResult:
    """Per-step samples of one run. `breakdowns[k]` holds step k's slots per category (in the
    order of CATEGORIES); `num_running[k]` and `num_waiting[k]` count requests at that time."""

    capacity: int
    breakdowns: np.ndarray  # int64 [num_steps, len(CATEGORIES)]
    num_running: np.ndarray  # int64 [num_steps]
    num_waiting: np.ndarray  # int64 [num_steps]
    num_preemptions: int

    @property
    def memory_bound(self) -> np.ndarray:
        """Steps at which a request was waiting for memory (the waiting queue was non-empty)."""
        return self.num_waiting > 0

    def average_percentages(self, steps: np.ndarray) -> dict[str, float]:
        """Each category as a percent of the KV space, averaged over the selected steps."""
        if not steps.any():
            return dict.fromkeys(CATEGORIES, math.nan)
        mean = self.breakdowns[steps].mean(axis=0)
        return {name: 100.0 * value / self.capacity for name, value in zip(CATEGORIES, mean, strict=True)}


def serve(
    cache: KVCache,
    requests: list[Request],
    step_duration: float = STEP_DURATION,
    measure_memory: bool = True,
    stop_at_last_arrival: bool = False,
    on_step: Callable[[LLMEngine], None] | None = None,
) -> ServeResult:
    """Run a trace through `cache` until every request has finished, or with
    stop_at_last_arrival=True until the step at which the last request arrives (see the module
    docstring). With measure_memory=False the breakdown is not sampled (zeros; request counts
    only). `on_step(engine)`, when given, sees the engine after every step (the notebooks draw
    the cache from it)."""
    if not step_duration > 0:  # also rejects NaN; a zero step would never reach a later arrival
        raise ValueError(f"step_duration must be a positive number of seconds, got {step_duration}")
    longest = max((r.final_len for r in requests), default=0)
    if longest > cache.capacity:
        raise ValueError(f"a request of {longest} tokens can never fit in a KV space of {cache.capacity} slots")
    engine = LLMEngine(cache, StandInRunner(), max_num_seqs=max(len(requests), 1),
                       max_num_batched_tokens=cache.capacity, measure_memory=measure_memory)
    pending = deque(sorted(requests, key=lambda r: r.arrival_time))
    samples: list[tuple[int, ...]] = []
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0].arrival_time <= step * step_duration:
            request = pending.popleft()
            params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
            engine.add(engine.make_request([0] * request.prompt_len, params, request_id=request.request_id))
        _, record = engine.step()
        if on_step is not None:
            on_step(engine)
        breakdown = record.breakdown
        counts = [0] * len(CATEGORIES) if breakdown is None else [getattr(breakdown, name) for name in CATEGORIES]
        samples.append((*counts, record.num_running, record.num_waiting))
        step += 1
        if stop_at_last_arrival and not pending:
            break
    table = np.array(samples, dtype=np.int64).reshape(-1, len(CATEGORIES) + 2)
    return ServeResult(
        capacity=cache.capacity,
        breakdowns=table[:, : len(CATEGORIES)],
        num_running=table[:, -2],
        num_waiting=table[:, -1],
        num_preemptions=engine.scheduler.num_preemptions,
    )
