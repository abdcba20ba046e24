"""What every experiment's figures share: the Agg backend (no display needed), one colour per
memory category (the same in every figure), and saving; the pictures of a contiguous arena that
the notebooks draw (a buddy allocator's blocks, and the arena slot by slot as a trace runs); and
the figures of an engine run (``LLM.stats``).

The Agg backend is chosen only when ``MPLBACKEND`` names none: a Jupyter kernel sets it to its
inline backend, so that a notebook shows the figures these functions return.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.animation import FuncAnimation  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

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


# -- a contiguous arena, drawn ------------------------------------------------------------

CATEGORY_ORDER = tuple(COLORS)  # an arena map holds, per slot, an index into this tuple


def draw_buddy(ax: plt.Axes, buddy, title: str = "") -> None:
    """A buddy allocator's slots as one strip: live slabs coloured, free blocks grey, each block
    labelled with its size, so that splits and merges show from one picture to the next."""
    for offset, size in sorted(buddy.live.items()):
        ax.barh(0, size, left=offset, color=COLORS["token_states"], edgecolor="black")
        ax.text(offset + size / 2, 0, f"slab\n{size}", ha="center", va="center", fontsize=7, color="white")
    for offset, size in buddy.free_blocks():
        ax.barh(0, size, left=offset, color=COLORS["free"], edgecolor="black")
        ax.text(offset + size / 2, 0, str(size), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, buddy.num_slots)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, loc="left")


def arena_map(engine) -> np.ndarray:
    """Each slot of a contiguous cache's arena as an index into CATEGORY_ORDER, from a running
    engine (``LLMEngine`` over a ``ContiguousKVCache``): the slot-level picture of its
    ``memory_breakdown``, with which its counts agree.

    A running request's slab holds its tokens, then the slots its remaining tokens will fill
    (reservation), then slots it will never fill (internal fragmentation). A free block smaller
    than the aligned block the next waiting request needs is external fragmentation.
    """
    cache, scheduler = engine.cache, engine.scheduler
    index = {name: i for i, name in enumerate(CATEGORY_ORDER)}
    slots = np.full(cache.capacity, index["free"], dtype=np.int8)
    for seq in (seq for group in scheduler.running for seq in group.seqs):
        start, size = cache.slab(seq.seq_id)
        filled, will_fill = cache.num_tokens(seq.seq_id), min(seq.max_len, size)
        slots[start:start + filled] = index["token_states"]
        slots[start + filled:start + will_fill] = index["reservation"]
        slots[start + will_fill:start + size] = index["internal_fragmentation"]
    if scheduler.waiting:
        head = scheduler.waiting[0].seqs[0]
        needed = cache.buddy.block_size_for(cache.reserved_slots(len(head.token_ids), head.max_len))
        for offset, size in cache.buddy.free_blocks():
            if size < needed:
                slots[offset:offset + size] = index["external_fragmentation"]
    return slots


def animate_arena(frames: list[np.ndarray], steps: list[int], width: int = 64, title: str = "") -> FuncAnimation:
    """An animation of arena maps (``arena_map`` at the given ``steps``): the arena wrapped into
    rows of ``width`` slots on the left, each category's share of it so far on the right."""
    shares = np.array([[100.0 * np.mean(f == i) for i in range(len(CATEGORY_ORDER))] for f in frames])
    rows = -(-len(frames[0]) // width)

    def grid(frame: np.ndarray) -> np.ndarray:
        padded = np.full(rows * width, -1, dtype=np.int16)  # slots past the arena's end: masked
        padded[:len(frame)] = frame
        return np.ma.masked_less(padded.reshape(rows, width), 0)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=60, gridspec_kw={"width_ratios": [1.2, 1]})
    cmap = ListedColormap([COLORS[name] for name in CATEGORY_ORDER])
    image = left.imshow(grid(frames[0]), cmap=cmap, vmin=-0.5, vmax=len(CATEGORY_ORDER) - 0.5,
                        aspect="auto", interpolation="nearest")
    left.set(xlabel=f"slot % {width}", ylabel=f"slot // {width}")
    right.stackplot(steps, shares.T, colors=[COLORS[n] for n in CATEGORY_ORDER],
                    labels=[LABELS[n] for n in CATEGORY_ORDER])
    cursor = right.axvline(steps[0], color="black")
    right.set(xlim=(steps[0], steps[-1]), ylim=(0, 100), xlabel="step", ylabel="share of the arena (%)")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    def show(i: int):
        image.set_data(grid(frames[i]))
        cursor.set_xdata([steps[i], steps[i]])
        left.set_title(f"the arena at step {steps[i]}", fontsize=9)
        return image, cursor

    show(0)
    animation = FuncAnimation(fig, show, frames=len(frames), interval=150, blit=False)
    plt.close(fig)  # shown through the animation, not as a still figure
    return animation


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
    step in each phase (schedule, prepare, forward, sample, wait, apply: ``LLMEngine.step``), stacked."""
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(runs) + 1.6))
    labels = list(runs)
    breakdowns = {label: stats.time_breakdown() for label, stats in runs.items()}
    phases = list(dict.fromkeys(phase for breakdown in breakdowns.values() for phase in breakdown))
    left = [0.0] * len(labels)
    for phase in phases:
        widths = [1e3 * breakdowns[label].get(phase, 0.0) / max(len(runs[label].steps), 1) for label in labels]
        ax.barh(labels, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set(xlabel="mean wall time per step (ms)", title="Where a step's time goes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig
