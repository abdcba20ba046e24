"""Memory waste of the paged cache against its block size: the memory side of the paper's
Figure 18b (§7.2).

A small block wastes little (at most block_size - 1 slots per sequence, in its last block) but
makes the attention kernel read the block table more often; a large block is kind to the kernel
but brings back internal fragmentation, and fewer requests fit. The paper measures the latency
side (Figure 18b: `paper.FIGURE_18B_BEST_BLOCK_SIZES`, smaller on Alpaca, where sequences are
short; vLLM's default is `paper.DEFAULT_BLOCK_SIZE`); this experiment measures the memory side,
with the allocator itself: the paged cache at block sizes 1, 2, 4, ..., 256 serves the same
trace as in `minipaged.experiments.fragmentation` (every request at time 0, in Figure 2's KV
space of `paper.NUM_KV_SLOTS` slots, or the largest multiple of the block size below it).

What is averaged, as in the fragmentation experiment: over the steps at which the waiting queue
is non-empty, each category's share of the KV space, and the number of running requests.
`waste` = reservation + internal + external fragmentation (what the paper's Figure 2 gives for
vLLM, at block size 16 on ShareGPT). For the paged cache, "reservation" is the part of the allocated
blocks' empty slots that the request will still fill, "internal" the part past its final length.

    python -m minipaged.experiments.block_size --out DIR [--dataset sharegpt alpaca]

Writes DIR/block_size.csv and DIR/block_size.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from matplotlib.ticker import FormatStrFormatter, NullFormatter, ScalarFormatter

from minipaged.experiments import cli, paper
from minipaged.experiments.plotting import COLORS, LABELS, plt, save
from minipaged.experiments.serve import CATEGORIES, make_cache, serve
from minipaged.workloads import make_trace

BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUICK_BLOCK_SIZES = [4, 16, 64]
WASTE = ("reservation", "internal_fragmentation", "external_fragmentation")


def one_run(workload: str, block_size: int, sizes: cli.Sizes, seed: int) -> dict:
    """The paged cache's averaged breakdown at one block size, as a CSV row."""
    requests = make_trace(workload, sizes.requests_for(workload), math.inf, seed, sizes.max_seq_len)
    result = serve(make_cache("paged", sizes.kv_slots, sizes.max_seq_len, block_size), requests)
    steps = result.memory_bound
    shares = result.average_percentages(steps)
    return {
        "dataset": cli.workload_name(workload),
        "block_size": block_size,
        **{name: round(shares[name], 2) for name in CATEGORIES},
        "waste": round(sum(shares[name] for name in WASTE), 2),
        "requests_batched": round(float(result.num_running[steps].mean()), 2) if steps.any() else math.nan,
        "preemptions": result.num_preemptions,
        "memory_bound_steps": int(steps.sum()),
        "requests": len(requests),
    }


def run(workloads: list[str], block_sizes: list[int], sizes: cli.Sizes = cli.PAPER_SIZES, seed: int = 0,
        jobs: int = 1) -> list[dict]:
    """One row per (workload, block size)."""
    runs = [(w, block_size, sizes, seed) for w in workloads for block_size in block_sizes]
    return cli.map_runs(one_run, runs, jobs, "block size")


def plot(rows: list[dict], path: Path) -> None:
    """Left: waste by kind against the block size, per dataset. Right: requests batched."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    fig, (waste_ax, batch_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, dataset in enumerate(datasets):
        style = ["-", "--", ":", "-."][i % 4]
        mine = [row for row in rows if row["dataset"] == dataset]
        block_sizes = [row["block_size"] for row in mine]
        waste_ax.plot(block_sizes, [row["waste"] for row in mine], "o" + style, color="black",
                      label=f"{dataset}: all waste")
        for name in WASTE:
            waste_ax.plot(block_sizes, [row[name] for row in mine], style, color=COLORS[name],
                          label=f"{dataset}: {LABELS[name]}")
        batch_ax.plot(block_sizes, [row["requests_batched"] for row in mine], "o" + style, color=f"C{i}",
                      label=dataset)
        if dataset in paper.FIGURE_18B_BEST_BLOCK_SIZES:
            low, high = paper.FIGURE_18B_BEST_BLOCK_SIZES[dataset]
            batch_ax.axvspan(low, high, alpha=0.1, color=f"C{i}",
                             label=f"{dataset}: best latency, paper Fig. 18b ({low}-{high})")
    vllm_block_size = paper.DEFAULT_BLOCK_SIZE  # Figure 2's vLLM bar is at vLLM's default block size
    waste_ax.plot(vllm_block_size, 100 - paper.FIGURE_2["paged"]["token_states"], "*", color="red", markersize=14,
                  markeredgecolor="black", label=f"paper Fig. 2: vLLM waste at {vllm_block_size} (ShareGPT)")
    for ax in (waste_ax, batch_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))  # 1, 2, ..., 256, not 1.0, 2.0, ...
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("block size (tokens per block)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    waste_ax.set_ylabel("share of the KV space (%)")
    waste_ax.set_title("Paged cache: memory waste vs block size")
    batch_ax.set_yscale("log")
    batch_ax.yaxis.set_major_formatter(ScalarFormatter())
    batch_ax.yaxis.set_minor_formatter(ScalarFormatter())
    batch_ax.set_ylabel("requests batched at once (mean, log scale)")
    batch_ax.set_title("Paged cache: batch size vs block size")
    fig.tight_layout()
    save(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: bad input stops here with a usage error."""
    parser = cli.new_parser(__doc__)
    cli.add_dataset(parser, ["sharegpt", "alpaca"], several=True)
    parser.add_argument("--block-sizes", type=cli.power_of_two, nargs="+",
                        help=f"block sizes, powers of two (default {BLOCK_SIZES})")
    args = cli.parse(parser, argv)
    args.block_sizes = args.block_sizes or (QUICK_BLOCK_SIZES if args.quick else BLOCK_SIZES)
    cli.check_kv_space(parser, args.sizes, ["paged"], args.block_sizes)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args.dataset, args.block_sizes, args.sizes, args.seed, args.jobs)
    cli.note_unbounded(rows, "block size")
    cli.write_csv(args.out / "block_size.csv", rows)
    plot(rows, args.out / "block_size.png")


if __name__ == "__main__":
    main()
