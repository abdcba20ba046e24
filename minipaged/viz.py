"""Pictures of the paged KV cache: the block pool and the block tables (paper §4.2-§4.4).

The paged cache keeps a sequence's K/V in fixed-size physical blocks that need not be
contiguous; its *block table* maps logical block 0, 1, 2, ... to physical blocks (§4.2-§4.3),
and a block may sit in several tables at once, counted by its reference count, so that forked
sequences share memory until one of them appends to a shared, partly filled block and gets a
copy (copy-on-write, §4.4). This module draws exactly that state, the same way for every run:

* ``snapshot(cache)`` copies the state of a ``PagedKVCache`` (tables, lengths, reference
  counts) into a ``PoolSnapshot``; ``changes(before, after)`` says which blocks were
  allocated, freed and copied between two snapshots;
* ``draw_pool`` draws the physical blocks as a grid of cells, ``draw_block_tables`` one row
  per sequence (logical block -> physical block), ``draw`` both side by side;
* ``animate`` writes a GIF of a list of snapshots; ``Recorder`` collects them while an engine
  runs (call it after each step).

How to read a cell, in both views: it is coloured by the sequence(s) holding the block (one
stripe per holder when it is shared), the coloured part rises with the block's fill (tokens in
the block / block_size), and a shared cell shows its reference count (``x2``). Given the
``previous`` snapshot, a cell allocated since is outlined in green, a copy-on-write copy in red
(with the block it was copied from), and a block freed since is hatched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.animation import PillowWriter
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from minipaged.kv import KVCache, PagedKVCache

# One colour per sequence, picked by its id (seq_id % len), so a sequence keeps its colour in
# every frame of an animation. Red and green are left out: they mark copies and new blocks.
SEQUENCE_COLORS = (
    "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#c5b0d5", "#c49c94",
)
NEW_COLOR, COPY_COLOR, FREED_COLOR = "#2ca02c", "#d62728", "#404040"
MAX_NUMBERED_BLOCKS = 64  # above this the pool's cells are too small to print their block ids


@dataclass(frozen=True)
class PoolSnapshot:
    """The paged cache's bookkeeping at one moment (no K/V data): what the pictures draw."""

    num_blocks: int
    block_size: int
    tables: dict[int, list[int]]  # live seq_id -> its physical blocks, logical block 0 first
    num_tokens: dict[int, int]  # live seq_id -> tokens it holds
    ref_counts: tuple[int, ...]  # per physical block (0 = free)
    label: str = ""  # e.g. "step 3"

    def __post_init__(self) -> None:
        if len(self.ref_counts) != self.num_blocks:
            raise ValueError(f"ref_counts has {len(self.ref_counts)} entries for {self.num_blocks} blocks")
        if set(self.tables) != set(self.num_tokens):
            raise ValueError(f"tables and num_tokens name different sequences: "
                             f"{sorted(self.tables)} vs {sorted(self.num_tokens)}")
        for seq_id, table in self.tables.items():
            if any(not 0 <= block < self.num_blocks for block in table):
                raise ValueError(f"sequence {seq_id}'s table {table} points outside blocks 0..{self.num_blocks - 1}")
            if self.num_tokens[seq_id] > len(table) * self.block_size:
                raise ValueError(f"sequence {seq_id} holds {self.num_tokens[seq_id]} tokens in "
                                 f"{len(table)} blocks of {self.block_size}")

    def holders(self, block: int) -> list[int]:
        """Live sequences whose tables hold ``block``, in seq_id order."""
        return self._blocks[block][0]

    def fill(self, block: int) -> int:
        """Tokens stored in ``block`` (0 when it is free)."""
        return self._blocks[block][1]

    @cached_property
    def _blocks(self) -> list[tuple[list[int], int]]:
        """Per physical block: (its holders, tokens stored), from one pass over the tables."""
        blocks: list[tuple[list[int], int]] = [([], 0) for _ in range(self.num_blocks)]
        for seq_id in sorted(self.tables):
            for i, block in enumerate(self.tables[seq_id]):
                holders, filled = blocks[block]
                holders.append(seq_id)
                tokens = min(max(self.num_tokens[seq_id] - i * self.block_size, 0), self.block_size)
                blocks[block] = (holders, max(filled, tokens))
        return blocks

    @property
    def num_free_blocks(self) -> int:
        return sum(count == 0 for count in self.ref_counts)


def snapshot(cache: KVCache, label: str = "") -> PoolSnapshot:
    """A copy of a paged cache's tables, lengths and reference counts (later changes do not alter it).

    Sequences swapped out to CPU memory hold no device blocks and are not in it. Blocks that the
    prefix cache keeps for reuse at reference count 0 count as free, as the allocator counts them.
    """
    if not isinstance(cache, PagedKVCache):
        raise ValueError(f"minipaged.viz draws paged caches (PagedKVCache: blocks and block tables); "
                         f"got a {type(cache).__name__}, which has no block tables")
    return PoolSnapshot(
        num_blocks=cache.num_blocks,
        block_size=cache.block_size,
        tables={seq_id: list(table) for seq_id, table in cache.block_tables.items()},
        num_tokens={seq_id: cache.num_tokens(seq_id) for seq_id in cache.block_tables},
        ref_counts=tuple(cache.allocator.ref_counts),
        label=label,
    )


@dataclass(frozen=True)
class BlockChanges:
    """What happened to the blocks between two snapshots."""

    allocated: tuple[int, ...] = ()  # free before, held after (copies' destinations included)
    freed: tuple[int, ...] = ()  # held before, free after
    copied: tuple[tuple[int, int], ...] = ()  # copy-on-write (src, dst): a table entry now in a new block
    forked: tuple[int, ...] = ()  # new sequences that start with blocks already held before
    gone: tuple[int, ...] = ()  # sequences live before and not after (freed, or swapped out)


def changes(before: PoolSnapshot, after: PoolSnapshot) -> BlockChanges:
    """Blocks allocated, freed and copied, and sequences forked, from ``before`` to ``after``.

    Copy-on-write is recognised the way it happens (§4.4): only a sequence's *last* block can be
    copied, only if it was partly filled, and the rest of the table stays as it was. So a copy is
    a sequence whose table equals its table in ``before`` up to that last block, which is now a
    newly allocated ``dst`` in place of ``src``. A sequence forked in between is compared with
    the table of ``before`` that it shares the most leading blocks with (its parent; see
    ``_parent`` for ties), so a fork
    and its copy in the same engine step are both seen, except for a parent of a single block
    (the child, once copied, shares nothing to find it by). A new prompt that reuses a live
    sequence's leading blocks through the prefix cache looks like a fork.
    """
    if (before.num_blocks, before.block_size) != (after.num_blocks, after.block_size):
        raise ValueError(f"the two snapshots are of different pools: {before.num_blocks} blocks of "
                         f"{before.block_size} slots vs {after.num_blocks} of {after.block_size}")
    allocated = [b for b in range(after.num_blocks) if before.ref_counts[b] == 0 and after.ref_counts[b] > 0]
    freed = [b for b in range(after.num_blocks) if before.ref_counts[b] > 0 and after.ref_counts[b] == 0]
    new_blocks = set(allocated)
    copied: set[tuple[int, int]] = set()
    forked = []
    for seq_id, table in after.tables.items():
        origin = seq_id if seq_id in before.tables else _parent(before, table, after.num_tokens[seq_id])
        if origin is None:
            continue
        if seq_id not in before.tables:
            forked.append(seq_id)
        old, last = before.tables[origin], len(before.tables[origin]) - 1
        if (before.num_tokens[origin] % before.block_size and len(table) > last
                and table[:last] == old[:last] and table[last] != old[last] and table[last] in new_blocks):
            copied.add((old[last], table[last]))
    return BlockChanges(
        allocated=tuple(allocated),
        freed=tuple(freed),
        copied=tuple(sorted(copied)),
        forked=tuple(sorted(forked)),
        gone=tuple(sorted(set(before.tables) - set(after.tables))),
    )


def _parent(snap: PoolSnapshot, table: list[int], num_tokens: int) -> int | None:
    """The sequence of ``snap`` that a new sequence of ``num_tokens`` tokens in ``table`` was most
    likely forked from: the one sharing the most leading blocks with it, then, among those (their
    last blocks may all differ from the child's copy), the longest that is not longer than the
    child; None if no table shares block 0."""

    def likeness(seq_id: int) -> tuple[int, bool, int]:
        other, shared = snap.tables[seq_id], 0
        while shared < min(len(other), len(table)) and other[shared] == table[shared]:
            shared += 1
        tokens = snap.num_tokens[seq_id]
        return shared, tokens <= num_tokens, tokens

    candidates = [seq_id for seq_id in sorted(snap.tables) if likeness(seq_id)[0] > 0]
    return max(candidates, key=likeness, default=None)  # max keeps the first (lowest seq_id) of equals


# -- drawing ---------------------------------------------------------------------------------
def sequence_color(seq_id: int) -> str:
    """The colour of a sequence in every picture of this module."""
    return SEQUENCE_COLORS[seq_id % len(SEQUENCE_COLORS)]


def _name(seq_id: int, names: dict[int, str] | None) -> str:
    return (names or {}).get(seq_id, f"seq {seq_id}")


def _marks(snap: PoolSnapshot, previous: PoolSnapshot | None) -> tuple[BlockChanges, dict[int, int]]:
    """The changes since ``previous`` (none without it) and copy destination -> source."""
    if previous is None:
        return BlockChanges(), {}
    diff = changes(previous, snap)
    return diff, {dst: src for src, dst in diff.copied}


def _draw_cell(ax: Axes, x: float, y: float, snap: PoolSnapshot, block: int, gid: str,
               copied_from: dict[int, int], allocated: set[int]) -> None:
    """One physical block as a unit cell at (x, y): holders' stripes filled to the block's fill level,
    the unfilled part pale; outlined in green if newly allocated, red if a copy-on-write copy."""
    holders = snap.holders(block)
    level = snap.fill(block) / snap.block_size
    for k, seq_id in enumerate(holders):
        width = 1 / len(holders)
        color = sequence_color(seq_id)
        ax.add_patch(Rectangle((x + k * width, y), width, 1, facecolor=color, alpha=0.25, linewidth=0))
        ax.add_patch(Rectangle((x + k * width, y), width, level, facecolor=color, linewidth=0))
    edge, line = ("#999999", 0.8)
    if block in copied_from:
        edge, line = COPY_COLOR, 3
    elif block in allocated:
        edge, line = NEW_COLOR, 3
    cell = Rectangle((x + 0.04, y + 0.04), 0.92, 0.92, fill=False, edgecolor=edge, linewidth=line)
    cell.set_gid(gid)
    ax.add_patch(cell)
    if len(holders) > 1:
        ax.text(x + 0.5, y + 0.5, f"x{snap.ref_counts[block]}", ha="center", va="center", fontsize=10,
                fontweight="bold", color="white", gid="ref_count",
                bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.6, linewidth=0))
    if block in copied_from:
        ax.text(x + 0.5, y + 0.1, f"from {copied_from[block]}", ha="center", va="bottom", fontsize=7,
                color=COPY_COLOR, fontweight="bold", gid="copied_from")


def _draw_freed(ax: Axes, x: float, y: float) -> None:
    freed = Rectangle((x + 0.04, y + 0.04), 0.92, 0.92, fill=False, edgecolor=FREED_COLOR, hatch="///",
                      linewidth=1.5, linestyle="--")
    freed.set_gid("freed")
    ax.add_patch(freed)


def _legend_handles(snap: PoolSnapshot, names: dict[int, str] | None, previous: PoolSnapshot | None) -> list[Patch]:
    """The sequences' colours (those freed since ``previous`` too) and, with ``previous``, the marks."""
    handles = [Patch(facecolor=sequence_color(s), label=_name(s, names)) for s in sorted(snap.tables)]
    if previous is not None:
        handles += [Patch(facecolor="white", edgecolor=FREED_COLOR, hatch="///", label=f"{_name(s, names)} (freed)")
                    for s in sorted(set(previous.tables) - set(snap.tables))]
        handles += [Patch(fill=False, edgecolor=NEW_COLOR, linewidth=3, label="newly allocated"),
                    Patch(fill=False, edgecolor=COPY_COLOR, linewidth=3, label="copy-on-write copy"),
                    Patch(fill=False, edgecolor=FREED_COLOR, hatch="///", linestyle="--", label="freed block")]
    return handles


def _legend(ax: Axes, handles: list[Patch]) -> None:
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7,
                  ncol=min(len(handles), 4), frameon=False)


def pool_columns(num_blocks: int) -> int:
    """Cells per row of the pool's grid: about twice as wide as tall, at most 32."""
    return max(1, min(num_blocks, 32, math.ceil(math.sqrt(2 * num_blocks))))


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def draw_pool(snap: PoolSnapshot, ax: Axes | None = None, *, names: dict[int, str] | None = None,
              previous: PoolSnapshot | None = None) -> Axes:
    """The physical blocks as a grid of cells, block 0 top left (see the module docstring for the cell)."""
    columns = pool_columns(snap.num_blocks)
    rows = math.ceil(snap.num_blocks / columns)
    ax = _new_axes(ax, (max(4.0, 0.55 * columns), max(2.5, 0.55 * rows + 1.2)))
    diff, copied_from = _marks(snap, previous)
    allocated, freed = set(diff.allocated), set(diff.freed)
    for block in range(snap.num_blocks):
        x, y = block % columns, rows - 1 - block // columns
        _draw_cell(ax, x, y, snap, block, "block", copied_from, allocated)
        if block in freed:
            _draw_freed(ax, x, y)
        if snap.num_blocks <= MAX_NUMBERED_BLOCKS:
            ax.text(x + 0.1, y + 0.9, str(block), ha="left", va="top", fontsize=6, color="#333333", gid="block_id")
    ax.set_xlim(0, columns)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    used = snap.num_blocks - snap.num_free_blocks
    ax.set_title(f"physical blocks: {used} of {snap.num_blocks} in use ({snap.block_size} slots each)", fontsize=9)
    _legend(ax, _legend_handles(snap, names, previous))
    return ax


def draw_block_tables(snap: PoolSnapshot, ax: Axes | None = None, *, names: dict[int, str] | None = None,
                      previous: PoolSnapshot | None = None, width: int | None = None) -> Axes:
    """One row per live sequence: its logical blocks (columns) holding physical block ids (cells).

    With ``previous``, the sequences freed since appear as hatched rows of the blocks they held.
    ``width`` fixes the number of logical blocks the axes show (frames of an animation share it).
    """
    diff, copied_from = _marks(snap, previous)
    allocated = set(diff.allocated)
    rows = [(seq_id, snap.tables[seq_id], False) for seq_id in sorted(snap.tables)]
    if previous is not None:
        rows += [(seq_id, previous.tables[seq_id], True) for seq_id in diff.gone]
    longest = max((len(table) for _, table, _ in rows), default=1)
    width = max(width or 0, longest, 1)
    ax = _new_axes(ax, (max(4.0, 0.6 * width + 1.5), max(2.5, 0.5 * len(rows) + 1.2)))
    for r, (seq_id, table, gone) in enumerate(rows):
        y = len(rows) - 1 - r
        ax.text(-0.15, y + 0.5, _name(seq_id, names) + (" (freed)" if gone else ""), ha="right", va="center",
                fontsize=8, color=FREED_COLOR if gone else sequence_color(seq_id), gid="row_name")
        for i, block in enumerate(table):
            if gone:  # the dropped table: hatched where its block was freed, a plain outline where others still hold it
                if snap.ref_counts[block] == 0:
                    _draw_freed(ax, i, y)
                else:
                    ax.add_patch(Rectangle((i + 0.04, y + 0.04), 0.92, 0.92, fill=False, edgecolor=FREED_COLOR,
                                           linestyle="--", linewidth=1, gid="released"))
            else:
                _draw_cell(ax, i, y, snap, block, "table_entry", copied_from, allocated)
            ax.text(i + 0.9, y + 0.9, str(block), ha="right", va="top", fontsize=8, gid="physical_block",
                    color=FREED_COLOR if gone else "black")
    for i in range(width):
        ax.text(i + 0.5, len(rows) + 0.1, str(i), ha="center", va="bottom", fontsize=7, color="#555555")
    ax.set_xlim(0, width)
    ax.set_ylim(0, max(len(rows), 1) + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("block tables\n(logical -> physical block)", fontsize=9)  # two lines: a table may be narrow
    _legend(ax, _legend_handles(snap, names, previous))
    return ax


def _draw_on(fig: Figure, snap: PoolSnapshot, names: dict[int, str] | None, previous: PoolSnapshot | None,
             table_width: int | None = None, table_rows: int | None = None) -> None:
    """Both views side by side on ``fig``, the pool on the left."""
    columns = pool_columns(snap.num_blocks)
    width = max(table_width or 0, max((len(t) for t in snap.tables.values()), default=1), 1)
    pool_ax, table_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [columns, width + 2]})
    draw_pool(snap, pool_ax, names=names, previous=previous)
    draw_block_tables(snap, table_ax, names=names, previous=previous, width=width)
    if table_rows is not None:
        table_ax.set_ylim(0, max(table_rows, 1) + 0.6)
    for ax in (pool_ax, table_ax):  # one legend for both, below them
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = _legend_handles(snap, names, previous)
    if handles:
        # "outside" places the legend below the axes where constrained layout makes room for it
        where = "outside lower center" if fig.get_layout_engine() is not None else "lower center"
        fig.legend(handles=handles, loc=where, fontsize=7, ncol=min(len(handles), 6), frameon=False)
    if snap.label:
        fig.suptitle(snap.label, fontsize=11)


def draw(snap: PoolSnapshot, *, names: dict[int, str] | None = None, previous: PoolSnapshot | None = None) -> Figure:
    """The still image: the pool (left) and the block tables (right)."""
    fig = plt.figure(figsize=_figure_size([snap]), layout="constrained")
    _draw_on(fig, snap, names, previous)
    return fig


def _figure_size(snaps: list[PoolSnapshot]) -> tuple[float, float]:
    columns = pool_columns(snaps[0].num_blocks)
    pool_rows = math.ceil(snaps[0].num_blocks / columns)
    width = max((len(t) for s in snaps for t in s.tables.values()), default=1)
    rows = max(len(s.tables) for s in snaps)
    return (max(8.0, 0.5 * (columns + width + 4)), max(3.5, 0.5 * max(pool_rows, rows + 2) + 2.0))


def animate(snaps: list[PoolSnapshot], path: str | Path, *, names: dict[int, str] | None = None,
            fps: int = 2) -> Path:
    """A GIF with one frame per snapshot, each drawn with the one before as ``previous``
    (so every frame marks what its step allocated, copied and freed). Returns the path."""
    if not snaps:
        raise ValueError("animate needs at least one snapshot")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if len({(s.num_blocks, s.block_size) for s in snaps}) > 1:
        raise ValueError("every snapshot must be of the same pool (same num_blocks and block_size)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every frame has the same size and the same table extent, so the picture does not jump.
    width = max((len(t) for s in snaps for t in s.tables.values()), default=1)
    rows = max(len(s.tables) + (len(set(p.tables) - set(s.tables)) if p else 0)
               for p, s in zip([None, *snaps], snaps))
    # Fixed margins rather than constrained layout, which would cost half of each frame's time.
    fig = Figure(figsize=_figure_size(snaps))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.14, top=0.88, wspace=0.12)
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(path), dpi=80):
        for k, snap in enumerate(snaps):
            fig.clear()
            _draw_on(fig, snap, names, snaps[k - 1] if k else None, width, rows)
            # A frame counter keeps equal snapshots distinct frames (Pillow merges identical ones).
            fig.text(0.995, 0.005, f"{k + 1}/{len(snaps)}", ha="right", va="bottom", fontsize=7, color="#777777")
            writer.grab_frame()
    return path


class Recorder:
    """Snapshots of an engine's paged cache, one per call: call it after each engine step.

    ``label`` is formatted with ``step``, counting calls from 1 (``"step {step}"``).
    """

    def __init__(self, label: str = "step {step}") -> None:
        self.label = label
        self.snapshots: list[PoolSnapshot] = []

    def __call__(self, engine) -> None:
        step = len(self.snapshots) + 1
        self.snapshots.append(snapshot(engine.cache, self.label.format(step=step)))
