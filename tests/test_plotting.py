"""The pictures of a contiguous arena that the notebooks draw (minipaged/experiments/plotting.py)."""

import math
from dataclasses import astuple

import numpy as np

from minipaged.experiments import plotting
from minipaged.experiments.serve import make_cache, serve
from minipaged.kv import BuddyAllocator
from minipaged.workloads import make_trace


def test_arena_map_agrees_with_the_memory_breakdown_at_every_step():
    trace = make_trace("alpaca", 60, math.inf, 0, 256)
    seen = []

    def check(engine):
        slots = plotting.arena_map(engine)
        head = engine.scheduler.waiting[0] if engine.scheduler.waiting else None
        expected = engine.cache.memory_breakdown(None if head is None else (len(head.token_ids), head.max_len))
        counts = np.bincount(slots, minlength=len(plotting.CATEGORY_ORDER))
        assert tuple(counts) == astuple(expected)
        seen.append(counts)

    serve(make_cache("contiguous-pow2", 1024, 256), trace, on_step=check)
    total = np.sum(seen, axis=0)
    # the trace waits for memory, so every kind of waste appears at some step
    assert all(total[plotting.CATEGORY_ORDER.index(name)] > 0 for name in plotting.CATEGORY_ORDER if name != "free")


def test_draw_buddy_labels_every_block():
    buddy = BuddyAllocator(64)
    buddy.allocate(20)
    fig, ax = plotting.plt.subplots()
    plotting.draw_buddy(ax, buddy, "after allocate(20)")
    labels = sorted(text.get_text() for text in ax.texts)
    assert labels == sorted(["slab\n20", "4", "8", "32"])
    assert ax.get_xlim() == (0, 64)
    plotting.plt.close(fig)


def test_animate_arena_has_a_frame_per_map():
    frames = [np.zeros(100, dtype=np.int8), np.full(100, 4, dtype=np.int8)]
    animation = plotting.animate_arena(frames, [0, 7], width=16)
    image = animation._fig.axes[0].images[0]  # FuncAnimation keeps its figure and frame function privately
    assert image.get_array().shape == (7, 16)  # 100 slots in rows of 16, the last row padded
    animation._func(1)
    assert image.get_array()[0, 0] == 4 and np.ma.is_masked(image.get_array()[-1, -1])
    assert "<script" in animation.to_jshtml()
