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

import argparse
import csv
import math
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from minipaged.experiments.paper import NUM_KV_SLOTS, STEP_DURATION
from minipaged.kv import ContiguousKVCache, KVCache, MemoryBreakdown, PagedKVCache
from minipaged.workloads import MAX_SEQ_LEN, Request, get_dataset, is_lengths_file, load_lengths

T = TypeVar("T")

SYSTEMS = ("contiguous-max", "contiguous-pow2", "contiguous-oracle", "paged")
CATEGORIES = tuple(f.name for f in fields(MemoryBreakdown))


def make_cache(system: str, num_slots: int, max_seq_len: int = MAX_SEQ_LEN, block_size: int = 16) -> KVCache:
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


@dataclass(frozen=True)
class Sizes:
    """How large a run is: the KV space, the model's maximum length and the requests per run.

    num_requests=None means `default_requests` requests of a dataset (5 times as many for alpaca,
    whose requests are ~6x shorter), and a replay of every line of a lengths file."""

    kv_slots: int = NUM_KV_SLOTS
    max_seq_len: int = MAX_SEQ_LEN
    num_requests: int | None = None
    default_requests: int = 1000

    def __post_init__(self) -> None:
        for name, value, least in [("kv_slots", self.kv_slots, 1), ("max_seq_len", self.max_seq_len, 2),
                                   ("default_requests", self.default_requests, 1)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.num_requests is not None and (
            isinstance(self.num_requests, bool) or not isinstance(self.num_requests, int) or self.num_requests < 1
        ):
            raise ValueError(f"--num-requests must be a positive integer, got {self.num_requests!r}")

    def requests_for(self, workload: str) -> int | None:
        if self.num_requests is not None:
            return self.num_requests
        if is_lengths_file(workload):
            return None  # replay the file
        return self.default_requests * (5 if workload == "alpaca" else 1)


PAPER_SIZES = Sizes()
# --quick: a KV space of 4096 slots (two Max slabs) with 100 ShareGPT / 500 Alpaca requests, all
# memory-bound at rate inf for every system (Alpaca's paged cache needs the 500).
QUICK = Sizes(kv_slots=4096, default_requests=100)


def map_runs(function: Callable[..., T], runs: list[tuple], jobs: int, desc: str) -> list[T]:
    """[function(*run) for run in runs], spread over `jobs` processes, with a progress bar."""
    if jobs == 1:
        return [function(*run) for run in tqdm(runs, desc=desc, leave=False, unit="run")]
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(function, *run) for run in runs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False, unit="run"):
            pass
        return [future.result() for future in futures]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (inf allowed; NaN, 0 and negatives are not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every experiment takes."""
    parser.add_argument("--out", required=True, help="directory for the CSV and PNG files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request traces")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                        help="runs in parallel (processes)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run for tests and a first look ({QUICK.default_requests} requests, "
                             f"{5 * QUICK.default_requests} for alpaca, {QUICK.kv_slots} slots)")
    parser.add_argument("--num-requests", type=positive_int,
                        help="requests per run (default 1000; 5000 for alpaca; a lengths file is replayed "
                             "in order, or with this option that many of its pairs are drawn with replacement)")
    parser.add_argument("--kv-slots", type=positive_int,
                        help=f"token slots of the KV space (default {NUM_KV_SLOTS}: OPT-13B on an A100-40GB)")
    parser.add_argument("--max-seq-len", type=positive_int,
                        help=f"the model's maximum length (default {MAX_SEQ_LEN})")


def check_workloads(parser: argparse.ArgumentParser, workloads: list[str], sizes: Sizes) -> None:
    """Stop with a usage error, before any run starts, on an unknown dataset or a bad lengths file."""
    for workload in workloads:
        try:
            if is_lengths_file(workload):
                load_lengths(workload, sizes.max_seq_len)
            else:
                get_dataset(workload)
        except (OSError, ValueError) as e:
            parser.error(f"--dataset {workload}: {e}")


def note_unbounded(rows: list[dict], what: str) -> None:
    """Print a note for each run in which no request ever waited for memory (its averages are NaN)."""
    for row in rows:
        if row["memory_bound_steps"] == 0:
            where = ", ".join(f"{key} {row[key]}" for key in ("dataset", "system", "block_size") if key in row)
            print(f"note: {what} ({where}): no request ever waited for memory, so its averages over the "
                  "memory-bound steps are empty (NaN); use more requests or a smaller --kv-slots", file=sys.stderr)


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    """The default (or --quick) sizes, with the options given on the command line."""
    sizes = QUICK if args.quick else PAPER_SIZES
    given = {"kv_slots": args.kv_slots, "max_seq_len": args.max_seq_len, "num_requests": args.num_requests}
    return replace(sizes, **{name: value for name, value in given.items() if value is not None})


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys, in column order) as a CSV file with a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
