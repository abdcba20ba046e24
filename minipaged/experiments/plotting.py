"""What every experiment's figures share: the Agg backend (no display needed), one colour per
memory category (the same in every figure), saving, and the figures of an engine run (``LLM.stats``)
that the notebooks draw.

The Agg backend is chosen only when ``MPLBACKEND`` names none: a Jupyter kernel sets it to its
inline backend, so that a notebook shows the figures these functions return.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COLORS = {
    "token_states": "#4c9a2a",
    "reservation": "#f2b134",
    "internal_fragmentation": "#d1495b",
    "external_fragmentation": "#8d5a97",
    "free": "#d9d9d9",
}
LABELS = {
    "token_states": "token states",
    "reservation": "reservation",
    "internal_fragmentation": "internal fragmentation",
    "external_fragmentation": "external fragmentation",
    "free": "free",
}
SYSTEM_LABELS = {
    "contiguous-max": "Max",
    "contiguous-pow2": "Pow2",
    "contiguous-oracle": "Oracle",
    "paged": "paged",
}


def save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _step_edges(stats) -> list[float]:
    """Wall-clock seconds since the run began at the start of each step, then at the end of the
    last one (a step's time is the sum of its phases)."""
    edges = [0.0]
    for step in stats.steps:
        edges.append(edges[-1] + sum(step.seconds.values()))
    return edges


def steps_figure(runs: dict) -> plt.Figure:
    """Engine runs over time, one line per run (``{label: llm.stats}``): the requests running in
    each step's batch, and the share of the KV space holding token states, each held for the
    step's duration."""
    fig, (batch_ax, kv_ax) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for label, stats in runs.items():
        edges = _step_edges(stats)
        running = [s.num_running for s in stats.steps]
        kv_share = [100 * u for u in stats.kv_utilization]
        name = f"{label}: {stats.output_tokens_per_second:,.0f} tok/s, mean batch {stats.mean_running:.1f}"
        # The last value is repeated so that the last step is drawn up to its end.
        batch_ax.step(edges, running + running[-1:], where="post", label=name)
        kv_ax.step(edges, kv_share + kv_share[-1:], where="post", label=label)
    batch_ax.set(ylabel="requests running", title="Continuous batching, step by step")
    batch_ax.set_ylim(bottom=0)
    kv_ax.set(xlabel="time since the first step (s)", ylabel="KV space holding tokens (%)", ylim=(0, 100))
    batch_ax.legend(fontsize=8)
    for ax in (batch_ax, kv_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def time_breakdown_figure(runs: dict) -> plt.Figure:
    """Where a step's host wall time goes, per run (``{label: llm.stats}``): mean milliseconds per
    step in each phase (schedule, prepare, forward, sample, postprocess), stacked."""
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(runs) + 1.6))
    labels = list(runs)
    phases = list(dict.fromkeys(phase for stats in runs.values() for phase in stats.time_breakdown()))
    left = [0.0] * len(labels)
    for phase in phases:
        widths = [1e3 * runs[label].time_breakdown().get(phase, 0.0) / max(len(runs[label].steps), 1)
                  for label in labels]
        ax.barh(labels, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set(xlabel="mean wall time per step (ms)", title="Where a step's time goes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig
