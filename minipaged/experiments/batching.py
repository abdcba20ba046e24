"""How many requests each system batches at once, against the request rate: the memory side of
the paper's Figure 13 (§6.2, OPT-13B, at the rates of `paper.FIGURE_13`).

A system can only batch the requests whose KV cache it can hold, so the less memory it wastes
the more requests run at once, and the higher its throughput (§6.2). Each system serves the same
requests (same seed: the same lengths at every rate, only spaced differently in time) through
the serving loop of `minipaged.experiments.serve`, in Figure 2's KV space (`paper.NUM_KV_SLOTS`).

How time maps to steps: the model is replaced by a fixed step duration (default
`paper.STEP_DURATION`, one decode iteration of OPT-13B on an A100; how it is derived is written
there). Step k happens at k x step_duration seconds, and a request arriving at time t joins the
queue at the first step at or after t. In reality an iteration's duration grows with the batch
and with prefills; a fixed duration keeps the model honest about memory only. Little's law says
what it implies: requests batched = rate x time in the system, and a request of L output tokens
spends at least L x step_duration seconds there.

What is averaged: the number of running requests, with equal weight over every step from the
first step to the step at which the last request arrives (while traffic is arriving; the drain
of the queue afterwards is not run).

    python -m minipaged.experiments.batching --out DIR [--dataset sharegpt alpaca] [--rates R ...]

Writes DIR/batching.csv (dataset, rate, system, requests_batched, ...) and DIR/batching.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minipaged.experiments import cli, paper
from minipaged.experiments.plotting import SYSTEM_LABELS, plt, save
from minipaged.experiments.serve import SYSTEMS, make_cache, serve
from minipaged.workloads import make_trace

RATES = {"sharegpt": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], "alpaca": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]}
QUICK_RATES = {"sharegpt": [1.0, 4.0], "alpaca": [15.0, 60.0]}


def one_run(workload: str, rate: float, system: str, sizes: cli.Sizes, seed: int, step_duration: float,
            block_size: int) -> dict:
    """The mean number of running requests while traffic arrives, as a CSV row."""
    requests = make_trace(workload, sizes.requests_for(workload), rate, seed, sizes.max_seq_len)
    cache = make_cache(system, sizes.kv_slots, sizes.max_seq_len, block_size)
    result = serve(cache, requests, step_duration, measure_memory=False, stop_at_last_arrival=True)
    return {
        "dataset": cli.workload_name(workload),
        "rate": rate,
        "system": system,
        "requests_batched": round(float(result.num_running.mean()), 2),
        "requests_waiting": round(float(result.num_waiting.mean()), 2),
        "preemptions": result.num_preemptions,
        "steps": len(result.num_running),
        "step_duration": step_duration,
    }


def run(
    workloads: list[str],
    rates: dict[str, list[float]],
    sizes: cli.Sizes = cli.PAPER_SIZES,
    seed: int = 0,
    step_duration: float = paper.STEP_DURATION,
    block_size: int = paper.DEFAULT_BLOCK_SIZE,
    jobs: int = 1,
) -> list[dict]:
    """One row per (workload, rate, system). `rates` maps each workload to its request rates."""
    runs = [(w, rate, system, sizes, seed, step_duration, block_size)
            for w in workloads for rate in rates[w] for system in SYSTEMS]
    return cli.map_runs(one_run, runs, jobs, "batching")


def figure(rows: list[dict]) -> plt.Figure:
    """Per dataset: requests batched against the rate, one line per system, the paper's points."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, system in enumerate(SYSTEMS):
            color = f"C{i}"
            points = [(row["rate"], row["requests_batched"]) for row in rows
                      if row["dataset"] == dataset and row["system"] == system]
            ax.plot(*zip(*points, strict=True), "o-", color=color, label=f"{SYSTEM_LABELS[system]} (ours)")
            if dataset in paper.FIGURE_13:
                rate, batched = paper.FIGURE_13[dataset]
                ax.plot(rate, batched[system], "*", color=color, markersize=14, markeredgecolor="black",
                        label=f"{SYSTEM_LABELS[system]} (paper Fig. 13)")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("requests batched at once (mean)")
        ax.set_title(f"Batch size vs load, {dataset} (step = {rows[0]['step_duration'] * 1000:.0f} ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig


def plot(rows: list[dict], path: Path) -> None:
    save(figure(rows), path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: bad input stops here with a usage error. args.rates_by_dataset
    maps each dataset to its rates."""
    parser = cli.new_parser(__doc__)
    cli.add_dataset(parser, ["sharegpt", "alpaca"], several=True)
    parser.add_argument("--rates", type=cli.positive_number(allow_inf=True), nargs="+",
                        help="request rates (req/s) for every dataset (default: around the paper's rate)")
    cli.add_step_duration(parser)
    cli.add_block_size(parser)
    args = cli.parse(parser, argv)
    defaults = QUICK_RATES if args.quick else RATES
    args.rates_by_dataset = {w: args.rates or defaults.get(w) for w in args.dataset}
    missing = [w for w, r in args.rates_by_dataset.items() if not r]
    if missing:
        parser.error(f"--rates is needed for {', '.join(missing)} (defaults exist for {', '.join(RATES)})")
    cli.check_kv_space(parser, args.sizes, SYSTEMS, [args.block_size])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args.dataset, args.rates_by_dataset, args.sizes, args.seed, args.step_duration, args.block_size,
               args.jobs)
    cli.write_csv(args.out / "batching.csv", rows)
    plot(rows, args.out / "batching.png")


if __name__ == "__main__":
    main()
