"""The serving loop's accounting on traces small enough to work out by hand, and a quick smoke run
of every experiment.

Breakdown rows below are (token_states, reservation, internal_fragmentation,
external_fragmentation, free) in slots, one row per step, sampled at the end of the step (after
growth, frees and admissions).
"""

import csv

import pytest

from minipaged.experiments import __main__ as run_all
from minipaged.experiments import fragmentation
from minipaged.experiments.serve import make_cache, serve
from minipaged.kv import ContiguousKVCache, PagedKVCache
from minipaged.workloads import Request


def trace(*lengths: tuple[int, int], arrivals: tuple[float, ...] | None = None) -> list[Request]:
    arrivals = arrivals or (0.0,) * len(lengths)
    return [Request(i, t, p, o) for i, ((p, o), t) in enumerate(zip(lengths, arrivals, strict=True))]


def test_contiguous_max():
    # 16 slots, max_seq_len 8: every request reserves a slab of 8, so two fit.
    # A = (prompt 2, output 3, final 5), B = (3, 2, final 5), C = (1, 1, final 2), all at t = 0.
    cache = ContiguousKVCache(16, "max", max_seq_len=8)
    result = serve(cache, trace((2, 3), (3, 2), (1, 1)), step_duration=1.0)
    assert result.breakdowns.tolist() == [
        # step 0: A [0,8) holds 2, B [8,16) holds 3 -> tokens 5; reservation (5-2)+(5-3) = 5;
        #         internal (8-5)+(8-5) = 6; C waits, no slot free.
        [5, 5, 6, 0, 0],
        # step 1: A 3, B 4 -> tokens 7, reservation 2+1, internal 6.
        [7, 3, 6, 0, 0],
        # step 2: A 4; B reaches 5 and leaves; C takes B's slab: tokens 4+1, reservation 1+1,
        #         internal 3 + (8-2).
        [5, 2, 9, 0, 0],
        # step 3: A and C reach their final lengths and leave.
        [0, 0, 0, 0, 16],
    ]
    assert result.num_running.tolist() == [2, 2, 2, 0]
    assert result.num_waiting.tolist() == [1, 1, 0, 0]
    assert result.num_preemptions == 0
    # Averaged over steps 0-1 (C waiting): tokens 6/16, reservation 4/16, internal 6/16.
    assert result.average_percentages(result.memory_bound) == {
        "token_states": 37.5, "reservation": 25.0, "internal_fragmentation": 37.5,
        "external_fragmentation": 0.0, "free": 0.0,
    }


def test_contiguous_oracle_external_fragmentation():
    # 16 slots. A = (3, 2, final 5), B = (4, 4, final 8), C = (2, 1, final 3).
    # A gets [0,5) out of the aligned block [0,8); the buddy allocator returns [5,6) and [6,8).
    # B gets [8,16). C's slab of 3 needs an aligned block of 4: the free pieces are 1 and 2 slots.
    cache = ContiguousKVCache(16, "oracle", max_seq_len=16)
    result = serve(cache, trace((3, 2), (4, 4), (2, 1)), step_duration=1.0)
    assert result.breakdowns.tolist() == [
        # step 0: tokens 3+4, reservation (5-3)+(8-4), the 3 free slots cannot serve C.
        [7, 6, 0, 3, 0],
        # step 1: A 4, B 5 -> tokens 9, reservation 1+3; still 3 slots of external fragmentation.
        [9, 4, 0, 3, 0],
        # step 2: A leaves and [0,8) coalesces; B 6; C takes [0,3): tokens 6+2, reservation 2+1,
        #         free 16-8-3 = 5 (no one waits, so none of it is external).
        [8, 3, 0, 0, 5],
        # step 3: B 7, C reaches 3 and leaves.
        [7, 1, 0, 0, 8],
        # step 4: B leaves.
        [0, 0, 0, 0, 16],
    ]
    assert result.num_waiting.tolist() == [1, 1, 0, 0, 0]
    # Averaged over steps 0-1: tokens 8/16, reservation 5/16, external 3/16.
    assert result.average_percentages(result.memory_bound) == {
        "token_states": 50.0, "reservation": 31.25, "internal_fragmentation": 0.0,
        "external_fragmentation": 18.75, "free": 0.0,
    }


def test_paged_preemption_by_recomputation():
    # 4 blocks of 2 slots. A = (2, 4, final 6), B = (3, 3, final 6), both at t = 0.
    cache = PagedKVCache(4, 2, max_seq_len=8)
    result = serve(cache, trace((2, 4), (3, 3)), step_duration=1.0)
    assert result.breakdowns.tolist() == [
        # step 0: A 1 block (2 tokens), B 2 blocks (3 tokens, 1 slot it will fill); 1 block free.
        [5, 1, 0, 0, 2],
        # step 1: A grows to 3 and takes the last block; B grows to 4 inside its second block.
        [7, 1, 0, 0, 0],
        # step 2: A grows to 4. B needs a block, none is free and no one was admitted after it:
        #         B is preempted (1), then readmitted at once as a 4-token prompt in 2 blocks.
        [8, 0, 0, 0, 0],
        # step 3: A needs a block: B, admitted last, is preempted (2) and waits as a 4-token
        #         prompt. A (5 tokens) takes a third block; the 1 free block cannot hold B's 2.
        [5, 1, 0, 2, 0],
        # step 4: A reaches 6 and leaves; B is readmitted (4 tokens, 2 full blocks).
        [4, 0, 0, 0, 4],
        # step 5: B grows to 5 in a third block.
        [5, 1, 0, 0, 2],
        # step 6: B reaches 6 and leaves.
        [0, 0, 0, 0, 8],
    ]
    assert result.num_running.tolist() == [2, 2, 2, 1, 1, 1, 0]
    assert result.num_waiting.tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert result.num_preemptions == 2


def test_paged_internal_fragmentation():
    # Block size 4: a prompt of 5 with 1 output token (final 6) takes 2 blocks; of the second
    # block, slot 5 will be filled (reservation) and slots 6 and 7 never (internal).
    cache = PagedKVCache(4, 4, max_seq_len=8)
    result = serve(cache, trace((5, 1)), step_duration=1.0)
    assert result.breakdowns.tolist() == [[5, 1, 2, 0, 8], [0, 0, 0, 0, 16]]


def test_arrivals_map_to_steps():
    # Step k happens at k * step_duration: a request arriving at 2.5 s with 1 s steps joins at step 3.
    cache = make_cache("contiguous-oracle", 64, max_seq_len=16)
    requests = trace((1, 2), (1, 1), arrivals=(0.0, 2.5))
    result = serve(cache, requests, step_duration=1.0, measure_memory=False)
    assert result.num_running.tolist() == [1, 1, 0, 1, 0]
    assert not result.breakdowns.any()
    # Stopping at the last arrival runs steps 0..3 only.
    result = serve(make_cache("paged", 64, 16), requests, step_duration=1.0, stop_at_last_arrival=True)
    assert result.num_running.tolist() == [1, 1, 0, 1]


def test_bad_input():
    with pytest.raises(ValueError, match="allowed: contiguous-max"):
        make_cache("contiguous", 64)
    with pytest.raises(ValueError, match="never fit"):
        serve(make_cache("paged", 32, max_seq_len=64), trace((30, 10)))


def test_every_experiment_quick(tmp_path):
    run_all.main(["--out", str(tmp_path), "--quick"])
    expected = {
        "fragmentation.csv": "system,token_states,reservation,internal_fragmentation,external_fragmentation",
        "batching.csv": "dataset,rate,system,requests_batched",
        "block_size.csv": "dataset,block_size,token_states",
        "timeline.csv": "system,time_s,token_states",
    }
    for name, header in expected.items():
        with (tmp_path / name).open() as f:
            rows = list(csv.reader(f))
        assert ",".join(rows[0]).startswith(header)
        assert len(rows) > 1
        assert (tmp_path / name.replace(".csv", ".png")).stat().st_size > 10_000
    with (tmp_path / "fragmentation.csv").open() as f:
        systems = {(row["dataset"], row["system"]) for row in csv.DictReader(f)}
    assert len(systems) == 8  # two datasets x four systems


def test_fragmentation_on_a_lengths_file(tmp_path):
    lengths = tmp_path / "mine.json"
    lengths.write_text("[[100, 50], [20, 300], [7, 7]]")
    fragmentation.main(["--out", str(tmp_path), "--quick", "--jobs", "1", "--num-requests", "40",
                        "--dataset", str(lengths)])
    with (tmp_path / "fragmentation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["system"] for row in rows] == ["contiguous-max", "contiguous-pow2", "contiguous-oracle", "paged"]
    assert {row["dataset"] for row in rows} == {"mine"}
    max_row = rows[0]
    # Max reserves 2048 of the 4096 slots for every request: two run at once, nothing else fits.
    assert float(max_row["requests_batched"]) == 2.0
    assert float(max_row["external_fragmentation"]) == 0.0
