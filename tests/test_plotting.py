"""The figures of an engine run that the notebooks draw, on hand-made statistics."""

import pytest

from minipaged.engine.llm import RunStats, StepRecord
from minipaged.experiments.plotting import plt, steps_figure, time_breakdown_figure


def run_stats(running: list[int], cached: list[int], forward_ms: float) -> RunStats:
    steps = [StepRecord(num_running=r, num_waiting=0, num_batched_tokens=r, num_preempted=0, num_cached_tokens=c,
                        breakdown=None, seconds={"schedule": 0.001, "forward": forward_ms / 1e3})
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
