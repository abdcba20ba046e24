"""What every experiment's figures share: the Agg backend (no display needed), one colour per
memory category (the same in every figure), and saving; and the pictures of a contiguous arena
that the notebooks draw (a buddy allocator's blocks, and the arena slot by slot as a trace runs).

Agg is chosen only where nobody chose a backend: Jupyter sets ``MPLBACKEND`` to its inline
backend, and forcing Agg there would stop a notebook's figures from showing.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np

if "MPLBACKEND" not in os.environ:
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
    for seq in scheduler.running:
        start, size = cache.slab(seq.seq_id)
        filled, will_fill = cache.num_tokens(seq.seq_id), min(seq.max_len, size)
        slots[start:start + filled] = index["token_states"]
        slots[start + filled:start + will_fill] = index["reservation"]
        slots[start + will_fill:start + size] = index["internal_fragmentation"]
    if scheduler.waiting:
        head = scheduler.waiting[0]
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
