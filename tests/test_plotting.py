"""The pictures the notebooks draw (minipaged/experiments/plotting.py): a contiguous arena, and an engine run's
figures on hand-made statistics."""

import math
from dataclasses import astuple

import numpy as np
import pytest

from minipaged.engine.llm import RunStats, StepRecord
from minipaged.experiments import plotting
from minipaged.experiments.plotting import plt, steps_figure, time_breakdown_figure
from minipaged.experiments.serve import make_cache, serve
from minipaged.kv import BuddyAllocator
from minipaged.workloads import make_trace


def test_arena_map_agrees_with_the_memory_breakdown_at_every_step():
    trace = make_trace("alpaca", 60, math.inf, 0, 256)
    seen = []

    def check(engine):
        slots = plotting.arena_map(engine)
        head = engine.scheduler.waiting[0].seqs[0] if engine.scheduler.waiting else None
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


def run_stats(running: list[int], cached: list[int], forward_ms: float) -> RunStats:
    steps = [StepRecord(num_running=r, num_waiting=0, num_batched_tokens=r, num_preempted=0, num_cached_tokens=c,
                        num_table_blocks=0, num_used_blocks=0, breakdown=None,
                        seconds={"schedule": 0.001, "forward": forward_ms / 1e3})
             for r, c in zip(running, cached, strict=True)]
    return RunStats(num_requests=2, num_output_tokens=sum(running), elapsed=1.0, steps=steps, kv_capacity=100)


def test_steps_figure_draws_batch_and_kv_share_against_time():
    fig = steps_figure({"paged": run_stats([2, 2, 1], [10, 12, 7], 9.0), "max": run_stats([1, 1], [5, 6], 4.0)})
    batch_ax, kv_ax = fig.axes
    paged_batch, max_batch = batch_ax.get_lines()
    # Each step starts where the last ended (1 ms schedule + 9 ms forward) and holds its value to its end.
    assert list(paged_batch.get_xdata()) == pytest.approx([0.0, 0.01, 0.02, 0.03])
    assert list(paged_batch.get_ydata()) == [2, 2, 1, 1]
    assert list(kv_ax.get_lines()[1].get_ydata()) == [5.0, 6.0, 6.0]  # percent of the 100 slots
    assert "5 tok/s" in batch_ax.get_legend().get_texts()[0].get_text()
    plt.close(fig)


def test_time_breakdown_figure_stacks_the_mean_milliseconds_per_step():
    fig = time_breakdown_figure({"paged": run_stats([1, 1], [1, 1], 9.0)})
    [ax] = fig.axes
    schedule, forward = ax.patches
    assert round(schedule.get_width(), 6) == 1.0 and round(forward.get_width(), 6) == 9.0
    assert round(forward.get_x(), 6) == 1.0  # stacked after schedule
    plt.close(fig)
