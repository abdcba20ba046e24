"""Where the KV-cache memory goes: the paper's Figure 2 (§3), with its §6.1 baselines.

Four systems serve the same trace through the serving loop of `minipaged.experiments.serve`:
the contiguous cache with the Orca baselines' reservations (`contiguous-max`: the model's
maximum length; `contiguous-pow2`: the prompt plus the next power of two of the true output
length; `contiguous-oracle`: exactly the true length), slabs placed by a buddy allocator, and
the paged cache (block size 16, blocks on demand, preemption by recomputation). Every step the
KV space is split into token states / reservation / internal fragmentation / external
fragmentation / free (defined in `minipaged.kv.accounting`).

Defaults follow the paper's Figure 2 setting: OPT-13B on an A100-40GB, i.e. the KV space of
`paper.NUM_KV_SLOTS` token slots and OPT's maximum length (`minipaged.workloads.MAX_SEQ_LEN`);
1000 ShareGPT-like requests (5000 for Alpaca, whose requests are ~6x shorter; `cli.Sizes`).
Every request arrives at time 0 (rate inf, overridable with --rate), so requests wait for
memory throughout: memory is the bottleneck, as in the paper's measurement, and no step
duration is involved.

What is averaged: each category's share of the KV space (percent), averaged with equal weight
over the steps at which the waiting queue is non-empty, i.e. while memory limits the batch.
The final drain (queue empty, memory emptying) is left out; it would otherwise add "free"
memory that no system could have used. `requests_batched` is the mean number of running
requests over the same steps.

What differs from the paper (by how much is measured by this command and written in the README,
not here, so that the numbers live in one place: the CSVs and the README). (1) The lengths are
synthetic log-normals with the paper's means; the datasets' spread is unknown to us, and it
moves the contiguous bars, Max's and Pow2's most, while Oracle and paged hardly move. (2) Our
buddy allocator gives the unused tail of a power-of-two block back (Linux's alloc_pages_exact),
so Oracle's slack past a request's length is free, if fragmented, memory; this is one reading of
the paper, whose Oracle shows more external fragmentation and fewer token states than ours.
(3) Steps are model iterations of equal weight, and the paged cache is admitted into without
vLLM's 1% free-block watermark, so it preempts more often than vLLM would (the `preemptions`
column counts it). (4) One trace of 1000 requests is noisy: its mean lengths miss the targets by
a few percent, and every bar moves from seed to seed (run --seed 0 to 4 to see by how much).
Read differences of a few points from the paper as noise, and compare systems at the same seed.

    python -m minipaged.experiments.fragmentation --out DIR [--dataset sharegpt alpaca] [--seed N]

Writes DIR/fragmentation.csv (one row per dataset and system; columns start with
system,token_states,reservation,internal_fragmentation,external_fragmentation) and
DIR/fragmentation.png (our stacked bars beside the paper's Figure 2 bars).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from minipaged.experiments import cli, paper
from minipaged.experiments.plotting import COLORS, LABELS, SYSTEM_LABELS, plt, save
from minipaged.experiments.serve import CATEGORIES, SYSTEMS, make_cache, serve
from minipaged.workloads import make_trace


def one_run(workload: str, system: str, sizes: cli.Sizes, seed: int, rate: float, block_size: int) -> dict:
    """The averaged breakdown of one system over memory-bound steps, as a CSV row."""
    requests = make_trace(workload, sizes.requests_for(workload), rate, seed, sizes.max_seq_len)
    result = serve(make_cache(system, sizes.kv_slots, sizes.max_seq_len, block_size), requests)
    steps = result.memory_bound
    shares = result.average_percentages(steps)
    return {
        "system": system,
        **{name: round(shares[name], 2) for name in CATEGORIES},
        "requests_batched": round(float(result.num_running[steps].mean()), 2) if steps.any() else math.nan,
        "preemptions": result.num_preemptions,
        "memory_bound_steps": int(steps.sum()),
        "steps": len(steps),
        "requests": len(requests),
        "dataset": cli.workload_name(workload),
    }


def run(workloads: list[str], sizes: cli.Sizes = cli.PAPER_SIZES, seed: int = 0, rate: float = math.inf,
        block_size: int = paper.DEFAULT_BLOCK_SIZE, jobs: int = 1) -> list[dict]:
    """One row per (workload, system)."""
    runs = [(w, system, sizes, seed, rate, block_size) for w in workloads for system in SYSTEMS]
    return cli.map_runs(one_run, runs, jobs, "fragmentation")


def stacked_bar(ax: plt.Axes, x: float, values: dict[str, float], paper: bool) -> None:
    """One stacked bar of category shares; the paper's bars are hatched."""
    bottom = 0.0
    for name in [*CATEGORIES, "waste"]:
        height = values.get(name, 0.0)
        if height and not math.isnan(height):
            ax.bar(x, height, bottom=bottom, color=COLORS.get(name, "#555555"), hatch="//" if paper else None,
                   edgecolor="black" if paper else "white", linewidth=0.5)
            bottom += height
    if math.isnan(values["token_states"]):
        return
    ax.text(x, values["token_states"] / 2, f"{values['token_states']:.1f}", ha="center", va="center",
            fontsize=8, color="white")


def plot(rows: list[dict], path: Path) -> None:
    """Per dataset, our stacked bar beside the paper's Figure 2 bar for each system."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        ours = {row["system"]: row for row in rows if row["dataset"] == dataset}
        ticks, labels = [], []
        # Figure 2 is ShareGPT only: beside other workloads its bars say so.
        paper_label = "paper" if dataset == "sharegpt" else "paper\n(ShareGPT)"
        for i, system in enumerate(SYSTEMS):
            stacked_bar(ax, 3 * i, ours[system], paper=False)
            stacked_bar(ax, 3 * i + 1, paper.FIGURE_2[system], paper=True)
            ticks += [3 * i, 3 * i + 1]
            labels += [f"{SYSTEM_LABELS[system]}\nours", f"{SYSTEM_LABELS[system]}\n{paper_label}"]
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_xlabel("system (paper bars hatched: Fig. 2, ShareGPT, OPT-13B)")
        ax.set_ylabel("share of the KV space (%)")
        ax.set_title(f"Where the KV cache goes, {dataset} lengths")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[name]) for name in CATEGORIES]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="#555555", hatch="//"))
    fig.legend(handles, [*(LABELS[name] for name in CATEGORIES), "waste, all kinds (paper, vLLM)"],
               loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: bad input stops here with a usage error."""
    parser = cli.new_parser(__doc__)
    cli.add_dataset(parser, ["sharegpt"], several=True)
    parser.add_argument("--rate", type=cli.positive_number(allow_inf=True), default=math.inf,
                        help="requests per second (default inf: all at 0)")
    cli.add_block_size(parser)
    args = cli.parse(parser, argv)
    cli.check_kv_space(parser, args.sizes, SYSTEMS, [args.block_size])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args.dataset, args.sizes, args.seed, args.rate, args.block_size, args.jobs)
    cli.note_unbounded(rows, "fragmentation")
    cli.write_csv(args.out / "fragmentation.csv", rows)
    plot(rows, args.out / "fragmentation.png")


if __name__ == "__main__":
    main()
