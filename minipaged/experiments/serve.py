"""The serving loop every experiment runs: continuous batching over a real KV cache, with the
model replaced by known output lengths (paper §4.5 scheduling, §6.1 baselines).

Time advances in *steps* (iterations of the model). One step:

1. Requests whose arrival time has come join the back of the waiting queue (time of step
   k = k * step_duration seconds; the step duration is the one mapping from steps to seconds).
2. Every running request grows by one token (``append_slots``). A request whose next token
   is its last (it holds prompt + output - 1 tokens) leaves instead and frees its memory: its
   last token is sampled but never fed back to the model, so its KV is never stored (and the
   growth cannot preempt anyone).
3. First come, first served: while the request at the head of the waiting queue fits
   (``can_allocate(prompt_len, final_len)``), it is allocated and starts running (its prefill).
   Nothing overtakes the head, even if it would fit.
4. The cache's memory breakdown is sampled (``memory_breakdown(next_request=head of the
   waiting queue)``), with the number of running and waiting requests. A request admitted in
   this step counts with its prompt only: the state while the step's model pass runs. A
   request is thus sampled holding P, P+1, ..., P+O-1 tokens: it runs for O steps.

The contiguous cache reserves each request's slab up front, so a running request can always
grow. The paged cache allocates a block only when the previous one is full, so a running
request can find no free block; then, as vLLM does (§4.5, recomputation), the most recently
admitted running request is preempted: its blocks are freed and it goes back to the FRONT of
the waiting queue, to be recomputed later as a prompt of its original prompt plus the tokens
it had generated, with the same final length. Preemptions are counted.

The cache tensors are tiny (one layer, one head of dimension one) so a run is pure bookkeeping:
thousands of requests take seconds on a CPU.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields

import numpy as np

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
class Job:
    """A request in the server: `prompt_len` grows when it is preempted and must be recomputed."""

    request: Request
    prompt_len: int


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
) -> ServeResult:
    """Run a trace through `cache` until every request has finished, or with
    stop_at_last_arrival=True until the step at which the last request arrives (see the module
    docstring). With measure_memory=False the breakdown is not sampled (zeros; request counts
    only)."""
    if not step_duration > 0:  # also rejects NaN; a zero step would never reach a later arrival
        raise ValueError(f"step_duration must be a positive number of seconds, got {step_duration}")
    longest = max((r.final_len for r in requests), default=0)
    if longest > cache.capacity:
        raise ValueError(f"a request of {longest} tokens can never fit in a KV space of {cache.capacity} slots")
    pending = deque(sorted(requests, key=lambda r: r.arrival_time))
    waiting: deque[Job] = deque()
    running: deque[Job] = deque()  # in order of admission
    samples: list[tuple[int, ...]] = []
    num_preemptions = 0
    step = 0
    while pending or waiting or running:
        while pending and pending[0].arrival_time <= step * step_duration:
            request = pending.popleft()
            waiting.append(Job(request, request.prompt_len))

        # Decode: every running request grows by one token, in admission order.
        still_running: deque[Job] = deque()
        while running:
            job = running.popleft()
            seq_id = job.request.request_id
            if cache.num_tokens(seq_id) + 1 == job.request.final_len:  # its last token: done
                cache.free(seq_id)
                continue
            while not cache.can_append(seq_id) and running:
                num_preemptions += 1
                waiting.appendleft(preempt(cache, running.pop()))
            if not cache.can_append(seq_id):  # no one else left to preempt: preempt itself
                num_preemptions += 1
                waiting.appendleft(preempt(cache, job))
                continue
            cache.append_slots(seq_id)
            still_running.append(job)
        running = still_running

        # Admission, first come first served.
        while waiting and cache.can_allocate(waiting[0].prompt_len, waiting[0].request.final_len):
            job = waiting.popleft()
            cache.allocate(job.request.request_id, job.prompt_len, job.request.final_len)
            running.append(job)

        if measure_memory:
            head = (waiting[0].prompt_len, waiting[0].request.final_len) if waiting else None
            breakdown = cache.memory_breakdown(next_request=head)
            samples.append((*(getattr(breakdown, name) for name in CATEGORIES), len(running), len(waiting)))
        else:
            samples.append((*(0 for _ in CATEGORIES), len(running), len(waiting)))
        step += 1
        if stop_at_last_arrival and not pending:
            break
    table = np.array(samples, dtype=np.int64).reshape(-1, len(CATEGORIES) + 2)
    return ServeResult(
        capacity=cache.capacity,
        breakdowns=table[:, : len(CATEGORIES)],
        num_running=table[:, -2],
        num_waiting=table[:, -1],
        num_preemptions=num_preemptions,
    )


def preempt(cache: KVCache, job: Job) -> Job:
    """Free a running request's memory; it will be recomputed from all the tokens it holds."""
    seq_id = job.request.request_id
    num_tokens = cache.num_tokens(seq_id)
    cache.free(seq_id)
    return Job(job.request, num_tokens)
