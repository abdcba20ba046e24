"""The memory breakdown over time, contiguous against paged: Figure 2's averages (§3) unrolled,
so that the reader sees the waste appear as requests arrive.

Both caches serve the same ShareGPT-like trace (by default NUM_REQUESTS requests at the ShareGPT
rate of the paper's Figure 13) through the serving loop of `minipaged.experiments.serve`, with a
step of `paper.STEP_DURATION` (how it is derived is written there). The contiguous cache
(reservation policy `pow2` by default, which shows all three kinds of waste) fills the KV space
with reservations long before it is filled with tokens, and requests queue up while much of the
space holds no token. The paged cache serves the same trace with room to spare: requests rarely
wait for memory, and much of its space stays free. Its panel is therefore not a like-for-like
match for the paper's Figure 2 line, which is measured under memory pressure (see
`minipaged.experiments.fragmentation` for that: every request at time 0).

What is plotted: each category's share of the KV space, averaged over bins of consecutive steps
(at most NUM_BINS bins per run), against time, with the number of waiting requests on a second axis;
dashed lines mark the paper's Figure 2 token-state share for the same system, and each panel's
title gives the share of the steps at which a request waited for memory.

    python -m minipaged.experiments.timeline --out DIR [--reservation max|pow2|oracle] [--rate R]

Writes DIR/timeline.csv (system, time_s, the five categories in percent, running, waiting,
memory_bound: the share of the bin's steps at which a request waited) and DIR/timeline.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from minipaged.experiments import cli, paper
from minipaged.experiments.plotting import COLORS, LABELS, SYSTEM_LABELS, plt, save
from minipaged.experiments.serve import CATEGORIES, make_cache, serve
from minipaged.kv.contiguous import RESERVATIONS
from minipaged.workloads import Request, is_lengths_file, make_trace

NUM_BINS = 500
NUM_REQUESTS = 400  # requests of a dataset by default
QUICK_NUM_REQUESTS = 100


def one_run(system: str, requests: list[Request], sizes: cli.Sizes, step_duration: float) -> list[dict]:
    """One system's breakdown over time, averaged in bins of consecutive steps, as CSV rows."""
    result = serve(make_cache(system, sizes.kv_slots, sizes.max_seq_len), requests, step_duration)
    columns = np.column_stack([100.0 * result.breakdowns / result.capacity, result.num_running,
                               result.num_waiting, result.memory_bound])
    bin_size = math.ceil(len(columns) / NUM_BINS)  # steps per bin, for at most NUM_BINS bins
    rows = []
    for start in range(0, len(columns), bin_size):
        mean = columns[start:start + bin_size].mean(axis=0)
        rows.append({
            "system": system,
            "time_s": round(start * step_duration, 3),
            **{name: round(float(value), 2) for name, value in zip(CATEGORIES, mean[:-3], strict=True)},
            "running": round(float(mean[-3]), 2),
            "waiting": round(float(mean[-2]), 2),
            "memory_bound": round(float(mean[-1]), 4),
        })
    return rows


def run(workload: str, systems: list[str], rate: float, num_requests: int | None,
        sizes: cli.Sizes = cli.PAPER_SIZES, seed: int = 0, step_duration: float = paper.STEP_DURATION,
        jobs: int = 1) -> list[dict]:
    """One row per (system, bin of steps); every system serves the same trace."""
    requests = make_trace(workload, num_requests, rate, seed, sizes.max_seq_len)
    runs = [(system, requests, sizes, step_duration) for system in systems]
    return [row for rows in cli.map_runs(one_run, runs, jobs, "timeline") for row in rows]


def plot(rows: list[dict], path: Path) -> None:
    """One panel per system: stacked shares over time, waiting requests on the right axis."""
    systems = list(dict.fromkeys(row["system"] for row in rows))
    fig, axes = plt.subplots(len(systems), 1, figsize=(10, 3 * len(systems) + 0.8), sharex=True, squeeze=False)
    most_waiting = max(row["waiting"] for row in rows)
    for ax, system in zip(axes[:, 0], systems, strict=True):
        mine = [row for row in rows if row["system"] == system]
        times = [row["time_s"] for row in mine]
        ax.stackplot(times, *([row[name] for row in mine] for name in CATEGORIES),
                     colors=[COLORS[name] for name in CATEGORIES], labels=[LABELS[name] for name in CATEGORIES])
        paper_token_states = paper.FIGURE_2[system]["token_states"]
        ax.axhline(paper_token_states, color="black", linestyle="--", linewidth=1, label="paper Fig. 2: token states")
        ax.text(times[-1], paper_token_states, f" paper {paper_token_states}%", va="bottom", ha="right", fontsize=8)
        queue_ax = ax.twinx()
        queue_ax.plot(times, [row["waiting"] for row in mine], color="black", linewidth=1, label="waiting requests")
        queue_ax.set_ylim(0, 1.05 * most_waiting + 1)
        queue_ax.set_ylabel("waiting requests")
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of the KV space (%)")
        # Bins are of equal size except perhaps the last: a mean over bins is close enough for a title.
        bound = 100 * float(np.mean([row["memory_bound"] for row in mine]))
        note = "" if bound >= 50 else "; rarely memory-bound, unlike the paper's Fig. 2 setting"
        ax.set_title(f"{SYSTEM_LABELS[system]} ({system}): KV space over time; "
                     f"requests wait for memory {bound:.0f}% of the time{note}", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    queue_handles, queue_labels = queue_ax.get_legend_handles_labels()
    fig.legend(handles + queue_handles, labels + queue_labels, loc="lower center", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: bad input stops here with a usage error. args.systems are the
    two caches compared."""
    parser = cli.new_parser(__doc__)
    cli.add_dataset(parser, ["sharegpt"], several=False)
    parser.add_argument("--reservation", choices=RESERVATIONS, default="pow2",
                        help="reservation policy of the contiguous cache")
    parser.add_argument("--rate", type=cli.positive_number(allow_inf=True), default=paper.FIGURE_13["sharegpt"][0],
                        help="requests per second (default: Figure 13's ShareGPT rate)")
    cli.add_step_duration(parser)
    args = cli.parse(parser, argv)
    args.systems = [f"contiguous-{args.reservation}", "paged"]
    cli.check_kv_space(parser, args.sizes, args.systems, [paper.DEFAULT_BLOCK_SIZE])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    [workload] = args.dataset
    if args.sizes.num_requests is not None or is_lengths_file(workload):
        num_requests = args.sizes.num_requests  # None: replay the lengths file
    else:
        num_requests = QUICK_NUM_REQUESTS if args.quick else NUM_REQUESTS
    rows = run(workload, args.systems, args.rate, num_requests, args.sizes, args.seed, args.step_duration,
               args.jobs)
    cli.write_csv(args.out / "timeline.csv", rows)
    plot(rows, args.out / "timeline.png")


if __name__ == "__main__":
    main()
