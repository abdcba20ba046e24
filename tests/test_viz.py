"""minipaged.viz: snapshots of a paged cache, what changed between two, and the pictures drawn from them.

The pictures are tested by what they contain (cells, numbers, marks, frames), not by their pixels.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from minipaged import viz  # noqa: E402
from minipaged.kv import ContiguousKVCache, PagedKVCache  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def beam_search() -> list[viz.PoolSnapshot]:
    """A hand-made beam search on 16 blocks of 4 slots; the free list hands out blocks 0, 1, 2, ... in order.

    prompt: seq 0 holds 6 tokens in blocks [0, 1]
    fork:   beams 1 and 2 share them (counts 3)
    append: beams 1 and 2 each copy the shared, half-full block 1 (into 2 and 3); beam 0 then owns it
    prune:  beam 2 is dropped (block 3 freed) and beam 1 forked into beam 3
    append: beam 1 copies block 2 (shared with beam 3, 3 of 4 slots filled) into block 4
    grow:   every beam's last block is full: beams 0, 1 and 3 get blocks 5, 6, 7 (no copies)
    """
    cache = PagedKVCache(16, 4)
    cache.allocate(0, 6)
    snaps = [viz.snapshot(cache, "prompt")]
    cache.fork(0, 1)
    cache.fork(0, 2)
    snaps.append(viz.snapshot(cache, "fork"))
    for seq_id in (1, 2, 0):
        cache.append_slots(seq_id)
    snaps.append(viz.snapshot(cache, "append"))
    cache.free(2)
    cache.fork(1, 3)
    snaps.append(viz.snapshot(cache, "prune"))
    for seq_id in (1, 3, 0):
        cache.append_slots(seq_id)
    snaps.append(viz.snapshot(cache, "append 2"))
    for seq_id in (0, 1, 3):
        cache.append_slots(seq_id)
    snaps.append(viz.snapshot(cache, "grow"))
    return snaps


def gids(ax, gid: str) -> list:
    return [artist for artist in [*ax.patches, *ax.texts] if artist.get_gid() == gid]


# -- snapshots and changes -------------------------------------------------------------------
def test_snapshot_copies_tables_lengths_and_counts():
    prompt, fork, append, *_ = beam_search()
    assert prompt.tables == {0: [0, 1]} and prompt.num_tokens == {0: 6}
    assert prompt.ref_counts == (1, 1) + (0,) * 14
    assert fork.tables == {0: [0, 1], 1: [0, 1], 2: [0, 1]}
    assert fork.ref_counts[:3] == (3, 3, 0)
    assert append.tables == {0: [0, 1], 1: [0, 2], 2: [0, 3]}
    assert append.num_tokens == {0: 7, 1: 7, 2: 7}
    assert (append.num_blocks, append.block_size, append.label) == (16, 4, "append")


def test_snapshot_is_not_changed_by_later_operations():
    cache = PagedKVCache(8, 4)
    cache.allocate(0, 3)
    snap = viz.snapshot(cache)
    cache.append_slots(0, 2)
    cache.fork(0, 1)
    assert snap.tables == {0: [0]} and snap.num_tokens == {0: 3} and snap.ref_counts[0] == 1


def test_reference_counts_equal_the_tables_holding_each_block():
    for snap in beam_search():
        for block in range(snap.num_blocks):
            holding = sum(table.count(block) for table in snap.tables.values())
            assert snap.ref_counts[block] == holding == len(snap.holders(block))


def test_changes_of_the_beam_search_are_exact():
    prompt, fork, append, prune, append2, grow = beam_search()
    assert viz.changes(prompt, fork) == viz.BlockChanges(forked=(1, 2))
    assert viz.changes(fork, append) == viz.BlockChanges(allocated=(2, 3), copied=((1, 2), (1, 3)))
    assert viz.changes(append, prune) == viz.BlockChanges(freed=(3,), forked=(3,), gone=(2,))
    assert viz.changes(prune, append2) == viz.BlockChanges(allocated=(4,), copied=((2, 4),))
    assert viz.changes(append2, grow) == viz.BlockChanges(allocated=(5, 6, 7))


def test_a_fork_and_its_copy_in_one_step_are_both_seen():
    cache = PagedKVCache(16, 4)
    cache.allocate(0, 7)  # blocks [0, 1], block 1 three quarters full
    before = viz.snapshot(cache)
    cache.fork(0, 1)
    assert cache.append_slots(1) == [(1, 2)]
    assert viz.changes(before, viz.snapshot(cache)) == viz.BlockChanges(allocated=(2,), copied=((1, 2),), forked=(1,))


def test_a_new_prompt_is_allocated_not_forked_and_a_full_block_is_never_copied():
    cache = PagedKVCache(16, 4)
    cache.allocate(0, 4)
    cache.fork(0, 1)
    before = viz.snapshot(cache)
    cache.append_slots(1)  # block 0 is full: a new block, no copy
    cache.allocate(2, 5)
    assert viz.changes(before, viz.snapshot(cache)) == viz.BlockChanges(allocated=(1, 2, 3))


def test_a_fork_of_a_copied_beam_is_compared_with_that_beam():
    cache = PagedKVCache(16, 4)
    cache.allocate(0, 6)
    cache.fork(0, 1)
    cache.append_slots(1)  # beam 1: [0, 2], beam 0: [0, 1]
    before = viz.snapshot(cache)
    cache.fork(1, 2)
    assert cache.append_slots(2) == [(2, 3)]
    assert viz.changes(before, viz.snapshot(cache)) == viz.BlockChanges(allocated=(3,), copied=((2, 3),), forked=(2,))


def test_swapping_out_and_in_moves_blocks_without_copies():
    cache = PagedKVCache(8, 4, num_cpu_blocks=4)
    cache.allocate(0, 6)  # blocks [0, 1]
    cache.allocate(1, 2)  # block [2]
    before = viz.snapshot(cache)
    cache.swap_out([0])
    cache.allocate(2, 1)  # takes block 3, so that sequence 0 comes back elsewhere
    cache.swap_in([0])
    after = viz.snapshot(cache)
    assert after.tables[0] == [4, 5]
    assert viz.changes(before, after) == viz.BlockChanges(allocated=(3, 4, 5), freed=(0, 1))


def test_fill_counts_the_tokens_in_each_block():
    snap = beam_search()[2]  # 7 tokens each: block 0 full, last blocks 3 of 4
    assert [snap.fill(b) for b in range(5)] == [4, 3, 3, 3, 0]


def test_contiguous_cache_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="paged caches"):
        viz.snapshot(ContiguousKVCache(64, "max", max_seq_len=16))


def test_inconsistent_snapshots_are_refused():
    with pytest.raises(ValueError, match="ref_counts has 2 entries"):
        viz.PoolSnapshot(4, 2, {}, {}, (0, 0))
    with pytest.raises(ValueError, match="points outside"):
        viz.PoolSnapshot(2, 2, {0: [5]}, {0: 1}, (1, 0))
    with pytest.raises(ValueError, match="holds 5 tokens"):
        viz.PoolSnapshot(2, 2, {0: [0]}, {0: 5}, (1, 0))
    with pytest.raises(ValueError, match="different pools"):
        viz.changes(viz.PoolSnapshot(2, 2, {}, {}, (0, 0)), viz.PoolSnapshot(4, 2, {}, {}, (0,) * 4))


# -- pictures ----------------------------------------------------------------------------------
def test_draw_pool_has_one_cell_per_block_and_counts_on_shared_ones():
    fork = beam_search()[1]
    ax = viz.draw_pool(fork)
    assert len(gids(ax, "block")) == 16
    assert sorted(t.get_text() for t in gids(ax, "ref_count")) == ["x3", "x3"]  # blocks 0 and 1
    assert [t.get_text() for t in gids(ax, "block_id")] == [str(b) for b in range(16)]


def test_draw_pool_marks_copies_new_and_freed_blocks_against_the_previous_snapshot():
    _, fork, append, prune, *_ = beam_search()
    ax = viz.draw_pool(append, previous=fork)
    assert sorted(t.get_text() for t in gids(ax, "copied_from")) == ["from 1", "from 1"]
    cells = gids(ax, "block")
    outlined = [b for b, cell in enumerate(cells) if cell.get_linewidth() > 1]
    assert outlined == [2, 3]
    assert not gids(ax, "freed")
    ax = viz.draw_pool(prune, previous=append)
    assert len(gids(ax, "freed")) == 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["seq 0", "seq 1", "seq 3", "seq 2 (freed)", "newly allocated", "copy-on-write copy",
                      "freed block"]


def test_draw_block_tables_has_one_cell_per_table_entry_and_names_each_row():
    append = beam_search()[2]
    ax = viz.draw_block_tables(append, names={0: "beam 0", 1: "beam 1", 2: "beam 2"})
    assert len(gids(ax, "table_entry")) == 6
    assert [t.get_text() for t in gids(ax, "row_name")] == ["beam 0", "beam 1", "beam 2"]
    assert [t.get_text() for t in gids(ax, "physical_block")] == ["0", "1", "0", "2", "0", "3"]
    assert [t.get_text() for t in gids(ax, "ref_count")] == ["x3", "x3", "x3"]  # block 0 in each row


def test_draw_block_tables_shows_a_dropped_table_with_its_freed_block_hatched():
    _, _, append, prune, *_ = beam_search()
    ax = viz.draw_block_tables(prune, previous=append)
    assert [t.get_text() for t in gids(ax, "row_name")] == ["seq 0", "seq 1", "seq 3", "seq 2 (freed)"]
    assert len(gids(ax, "table_entry")) == 6
    assert len(gids(ax, "freed")) == 1  # block 3; block 0 is still held by the others
    assert len(gids(ax, "released")) == 1


def test_draw_is_both_views_side_by_side_with_the_label():
    snaps = beam_search()
    fig = viz.draw(snaps[4], previous=snaps[3])
    pool_ax, table_ax = fig.axes
    assert len(gids(pool_ax, "block")) == 16
    assert len(gids(table_ax, "table_entry")) == 6
    assert fig._suptitle.get_text() == "append 2"
    assert len(gids(pool_ax, "copied_from")) == len(gids(table_ax, "copied_from")) == 1


def test_draw_into_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    snap = beam_search()[0]
    assert viz.draw_pool(snap, left) is left
    assert viz.draw_block_tables(snap, right) is right


def test_animate_writes_one_gif_frame_per_snapshot(tmp_path):
    snaps = beam_search()
    path = viz.animate(snaps, tmp_path / "beam.gif", names={0: "beam 0"}, fps=4)
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == len(snaps)
        assert gif.info["duration"] == 250


def test_animate_keeps_equal_snapshots_as_separate_frames(tmp_path):
    snap = beam_search()[0]
    with Image.open(viz.animate([snap, snap, snap], tmp_path / "same.gif")) as gif:
        assert gif.n_frames == 3


def test_animate_refuses_no_snapshots_and_mixed_pools(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        viz.animate([], tmp_path / "x.gif")
    other = viz.snapshot(PagedKVCache(8, 4))
    with pytest.raises(ValueError, match="same pool"):
        viz.animate([beam_search()[0], other], tmp_path / "x.gif")


class StandInEngine:
    """What Recorder needs of an engine: its cache."""

    def __init__(self, cache):
        self.cache = cache


def test_recorder_takes_one_labelled_snapshot_per_call():
    engine = StandInEngine(PagedKVCache(8, 2))
    recorder = viz.Recorder()
    engine.cache.allocate(0, 3)
    recorder(engine)
    engine.cache.append_slots(0)
    recorder(engine)
    assert [s.label for s in recorder.snapshots] == ["step 1", "step 2"]
    assert [s.num_tokens for s in recorder.snapshots] == [{0: 3}, {0: 4}]


def test_recorder_formats_its_own_label():
    recorder = viz.Recorder("after step {step}")
    recorder(StandInEngine(PagedKVCache(8, 2)))
    assert recorder.snapshots[0].label == "after step 1"
