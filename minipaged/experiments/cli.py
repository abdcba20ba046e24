"""The command line every experiment shares: the common flags, declared once here, the sizes of a
run (the paper's §6.1 setting, or a quick one), the process pool that spreads the runs over the
cores, and the CSV each experiment writes.

An experiment builds its parser with `new_parser`, adds `--dataset` with `add_dataset` and its
own flags, and `python -m minipaged.experiments` hands the common flags on to every experiment.

Bad input stops at the door with argparse's usage error (exit status 2) and a message naming the
flag, before any run starts: every number is checked by its argparse type, and what depends on
several flags (a lengths file against --max-seq-len, the KV space against a request of
--max-seq-len tokens) by `parse` and `check_kv_space`. A worker process never meets bad input, so
a traceback from one is a bug.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from minipaged.experiments.paper import DEFAULT_BLOCK_SIZE, NUM_KV_SLOTS, STEP_DURATION
from minipaged.experiments.serve import make_cache
from minipaged.workloads import MAX_SEQ_LEN, get_dataset, is_lengths_file, load_lengths

T = TypeVar("T")


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


def integer(at_least: int) -> Callable[[str], int]:
    """argparse type: an integer >= at_least."""

    def parse_integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < at_least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {at_least}, got {value}")
        return value

    return parse_integer


def power_of_two(text: str) -> int:
    """argparse type: a block size, a power of two >= 1 (what the paged cache accepts)."""
    value = integer(at_least=1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def positive_number(allow_inf: bool) -> Callable[[str], float]:
    """argparse type: a number > 0; NaN, 0 and negatives are refused, and inf unless allow_inf
    (a rate of inf means every request at time 0; a step of inf seconds means nothing)."""

    def parse_number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"must be a {'' if allow_inf else 'finite '}positive number, got {text}")
        return value

    return parse_number


def output_dir(text: str) -> Path:
    """argparse type: a directory that exists or can be made, checked now rather than after the runs."""
    path = Path(text)
    existing = next(p for p in [path, *path.parents] if p.exists())  # "." and "/" always exist
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {existing}")
    return path


def new_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a module's docstring, with every common flag."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, required=True, help="directory for the CSV and PNG files")
    parser.add_argument("--seed", type=integer(at_least=0), default=0, help="seed of the request traces")
    parser.add_argument("--jobs", type=integer(at_least=1), default=os.cpu_count() or 1,
                        help="runs in parallel (processes)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run for tests and a first look ({QUICK.default_requests} requests, "
                             f"{5 * QUICK.default_requests} for alpaca, {QUICK.kv_slots} slots)")
    parser.add_argument("--num-requests", type=integer(at_least=1),
                        help="requests per run (default 1000; 5000 for alpaca; a lengths file is replayed "
                             "in order, or with this option that many of its pairs are drawn with replacement)")
    parser.add_argument("--kv-slots", type=integer(at_least=1),
                        help=f"token slots of the KV space (default {NUM_KV_SLOTS}: OPT-13B on an A100-40GB)")
    parser.add_argument("--max-seq-len", type=integer(at_least=2),  # one prompt and one output token
                        help=f"the model's maximum length (default {MAX_SEQ_LEN})")
    return parser


def gpu_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """A parser for an experiment that measures a GPU: --out and --quick (``quick`` says how small);
    the request-trace flags of ``new_parser`` do not apply to it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=output_dir, required=True, help="directory for the CSV and PNG files")
    parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def add_dataset(parser: argparse.ArgumentParser, default: list[str], several: bool) -> None:
    """The --dataset flag: a synthetic dataset or a file of lengths, one workload or `several`.
    args.dataset is always a list."""
    files = ".csv/.json files" if several else "a .csv/.json file"
    parser.add_argument("--dataset", nargs="+" if several else 1, default=default,
                        help=f"sharegpt, alpaca, or {files} of (prompt, output) lengths (default: {' '.join(default)})")


def add_block_size(parser: argparse.ArgumentParser) -> None:
    """The --block-size flag: the paged cache's block size (default vLLM's)."""
    parser.add_argument("--block-size", type=power_of_two, default=DEFAULT_BLOCK_SIZE,
                        help=f"block size of the paged cache (default {DEFAULT_BLOCK_SIZE})")


def add_step_duration(parser: argparse.ArgumentParser) -> None:
    """The --step-duration flag: seconds per model step, which turns request rates into steps."""
    parser.add_argument("--step-duration", type=positive_number(allow_inf=False), default=STEP_DURATION,
                        help=f"seconds per model step (default {STEP_DURATION})")


def workload_name(workload: str) -> str:
    """A dataset's name, or the stem of a lengths file: the `dataset` column of the CSVs."""
    return Path(workload).stem


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, with args.sizes the run's Sizes. An unknown dataset or a bad
    lengths file stops with a usage error here, before any run starts."""
    args = parser.parse_args(argv)
    args.sizes = sizes_from_args(args)
    check_workloads(parser, args.dataset, args.sizes)
    return args


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    """The default (or --quick) sizes, with the options given on the command line."""
    sizes = QUICK if args.quick else PAPER_SIZES
    given = {"kv_slots": args.kv_slots, "max_seq_len": args.max_seq_len, "num_requests": args.num_requests}
    return replace(sizes, **{name: value for name, value in given.items() if value is not None})


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


def check_kv_space(parser: argparse.ArgumentParser, sizes: Sizes, systems: Iterable[str],
                   block_sizes: Iterable[int]) -> None:
    """Stop with a usage error, before any run starts, if a system's empty KV space cannot hold one
    request of --max-seq-len tokens: a trace may hold one that long, which would then never run.
    The caches themselves answer, so their rules (blocks, buddy alignment) are not written twice."""
    for system in systems:
        for block_size in block_sizes:
            try:
                cache = make_cache(system, sizes.kv_slots, sizes.max_seq_len, block_size)
                # An empty cache refuses a request only with a ValueError (the KVCache contract).
                assert cache.can_allocate(sizes.max_seq_len, sizes.max_seq_len)
            except ValueError as e:
                where = f"the paged cache (block size {block_size})" if system == "paged" else system
                parser.error(f"--kv-slots {sizes.kv_slots} cannot hold one request of --max-seq-len "
                             f"{sizes.max_seq_len} tokens in {where}: {e}")


def map_runs(function: Callable[..., T], runs: list[tuple], jobs: int, desc: str) -> list[T]:
    """[function(*run) for run in runs], spread over `jobs` processes, with a progress bar."""
    if jobs == 1:
        return [function(*run) for run in tqdm(runs, desc=desc, leave=False, unit="run")]
    # Fresh worker processes (spawn), not forks: a fork of a process that has started CUDA or
    # torch's thread pools (a notebook on a GPU) can hang in the child. Each worker keeps torch to
    # one thread: the workers already fill the cores, and torch's threads spin waiting for each other.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(function, *run) for run in runs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False, unit="run"):
            pass
        return [future.result() for future in futures]


def note_unbounded(rows: list[dict], what: str) -> None:
    """Print a note for each run in which no request ever waited for memory (its averages are NaN)."""
    for row in rows:
        if row["memory_bound_steps"] == 0:
            where = ", ".join(f"{key} {row[key]}" for key in ("dataset", "system", "block_size") if key in row)
            print(f"note: {what} ({where}): no request ever waited for memory, so its averages over the "
                  "memory-bound steps are empty (NaN); use more requests or a smaller --kv-slots", file=sys.stderr)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys, in column order) as a CSV file with a header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
