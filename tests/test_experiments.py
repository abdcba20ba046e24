"""The serving loop's accounting on traces small enough to work out by hand, and a quick smoke run
of every experiment.

Breakdown rows below are (token_states, reservation, internal_fragmentation,
external_fragmentation, free) in slots, one row per step, sampled at the end of the step (after
growth, frees and admissions).
"""

import csv
import math

import pytest

from minipaged.experiments import __main__ as run_all
from minipaged.experiments import batching, block_size, fragmentation, paper, timeline
from minipaged.experiments.cli import QUICK, Sizes
from minipaged.experiments.serve import make_cache, serve
from minipaged.kv import ContiguousKVCache, PagedKVCache
from minipaged.workloads import Request, make_trace


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
        #         B samples its last token and leaves at the end of the step.
        # step 2: A 4; C takes B's slab: tokens 4+1, reservation 1+1, internal 3 + (8-2).
        #         A and C sample their last tokens and leave: the run is over.
        [5, 2, 9, 0, 0],
    ]
    assert result.num_running.tolist() == [2, 2, 2]
    assert result.num_waiting.tolist() == [1, 1, 0]
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
        #         A samples its last token and leaves.
        # step 2: [0,8) has coalesced; B 6; C takes [0,3): tokens 6+2, reservation 2+1,
        #         free 16-8-3 = 5 (no one waits, so none of it is external). C leaves.
        [8, 3, 0, 0, 5],
        # step 3: B 7, and leaves.
        [7, 1, 0, 0, 8],
    ]
    assert result.num_waiting.tolist() == [1, 1, 0, 0]
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
        #         B preempts itself (1) and waits to be recomputed from all it had: 3 prompt + 2
        #         generated = 5 tokens in 3 blocks. The 2 free blocks cannot hold them.
        [4, 0, 0, 4, 0],
        # step 3: A needs a block and takes one (5 tokens); the 1 free block cannot hold B's 3.
        #         A samples its last token and leaves.
        [5, 1, 0, 2, 0],
        # step 4: B is readmitted (5 tokens, 3 blocks), samples its last token and leaves.
        [5, 1, 0, 0, 2],
    ]
    assert result.num_running.tolist() == [2, 2, 1, 1, 1]
    assert result.num_waiting.tolist() == [0, 0, 1, 1, 0]
    assert result.num_preemptions == 1


def test_paged_preempts_the_last_admitted_and_requeues_it_at_the_front():
    # 4 blocks of 2 slots, all at t = 0: A = (2, 4, final 6), B = (1, 3, final 4), C = (1, 1, final 2),
    # D = (2, 2, final 4). A request leaves at the end of the step that samples its last token.
    cache = PagedKVCache(4, 2, max_seq_len=8)
    result = serve(cache, trace((2, 4), (1, 3), (1, 1), (2, 2)), step_duration=1.0)
    assert result.breakdowns.tolist() == [
        # step 0: all four admitted, one block each (A 2, B 1, C 1, D 2 tokens); B and C will
        #         each fill the second slot of their block (reservation 2). C leaves.
        [6, 2, 0, 0, 0],
        # step 1: A (2 tokens) needs a block and takes C's (3 tokens); B grows to 2 in its block.
        #         D (2 tokens) needs a block, none is free: D, admitted last, preempts itself (1)
        #         -- not B, the oldest other request -- and waits as a 3-token prompt (2 blocks);
        #         its freed block (2 slots) cannot hold it: external 2.
        [5, 1, 0, 2, 0],
        # step 2: A grows to 4 in its second block; B (2 tokens) needs a block and takes D's
        #         (3 tokens). Tokens 4 + 3, reservation 1 (B). B leaves.
        [7, 1, 0, 0, 0],
        # step 3: A (4 tokens) takes a block (5 tokens, reservation 1); D still needs 2 blocks and
        #         1 is free: external 2. A leaves.
        [5, 1, 0, 2, 0],
        # step 4: D is readmitted (3 tokens, 2 blocks, reservation 1), and leaves.
        [3, 1, 0, 0, 4],
    ]
    assert result.num_running.tolist() == [4, 2, 2, 1, 1]
    assert result.num_waiting.tolist() == [0, 1, 1, 1, 0]
    assert result.num_preemptions == 1


def test_a_request_that_preempts_itself_goes_back_to_the_front():
    # 3 blocks of 2 slots, all at t = 0: A = (2, 2, final 4), B = (2, 2, final 4), C = (1, 1, final 2),
    # D = (1, 1, final 2).
    cache = PagedKVCache(3, 2, max_seq_len=8)
    result = serve(cache, trace((2, 2), (2, 2), (1, 1), (1, 1)), step_duration=1.0)
    assert result.breakdowns.tolist() == [
        # step 0: A, B, C one block each (C will fill its second slot: reservation 1); D waits.
        #         C leaves.
        [5, 1, 0, 0, 0],
        # step 1: A (2 tokens) takes C's block (3 tokens, reservation 1). B (2 tokens) needs a
        #         block, none is free and no one runs after it: B preempts itself (1) and goes to
        #         the FRONT: waiting = [B (3 tokens, 2 blocks), D]. The 1 free block cannot hold B,
        #         and D, which would fit, does not overtake it: external 2. A leaves.
        [3, 1, 0, 2, 0],
        # step 2: B (2 blocks, reservation 1) and D (1 block, reservation 1) are admitted; both leave.
        [4, 2, 0, 0, 0],
    ]
    assert result.num_running.tolist() == [3, 1, 2]
    assert result.num_waiting.tolist() == [1, 2, 0]
    assert result.num_preemptions == 1


def test_last_token_needs_no_slot():
    # 2 blocks of 2: A = (2, 1) and B = (2, 1), both at t = 0, fill both blocks. Each has one
    # token to generate; that token is sampled and never stored, so it needs no third block and
    # nobody is preempted: both leave at the end of step 0.
    result = serve(PagedKVCache(2, 2, max_seq_len=4), trace((2, 1), (2, 1)), step_duration=1.0)
    assert result.breakdowns.tolist() == [[4, 0, 0, 0, 0]]
    assert result.num_running.tolist() == [2]
    assert result.num_preemptions == 0


def test_first_come_first_served_without_overtaking():
    # 16 slots, oracle reservations. A = (4, 4, final 8) takes [0, 8); B = (6, 4, final 10) needs an
    # aligned block of 16 and waits until A leaves; C = (1, 1, final 2) would fit now but waits
    # behind B. A runs steps 0-3 and leaves; B takes [0, 10) and C [10, 12) at step 4.
    # C leaves after step 4, B (6 tokens at step 4) after its 4 steps, after step 7.
    cache = ContiguousKVCache(16, "oracle", max_seq_len=16)
    result = serve(cache, trace((4, 4), (6, 4), (1, 1)), step_duration=1.0)
    assert result.num_running.tolist() == [1, 1, 1, 1, 2, 1, 1, 1]
    assert result.num_waiting.tolist() == [2, 2, 2, 2, 0, 0, 0, 0]


def test_paged_internal_fragmentation():
    # Block size 4: a prompt of 5 with 1 output token (final 6) takes 2 blocks; of the second
    # block, slot 5 will be filled (reservation) and slots 6 and 7 never (internal).
    cache = PagedKVCache(4, 4, max_seq_len=8)
    result = serve(cache, trace((5, 1)), step_duration=1.0)
    assert result.breakdowns.tolist() == [[5, 1, 2, 0, 8]]


def test_arrivals_map_to_steps():
    # Step k happens at k * step_duration: a request arriving at 2.5 s with 1 s steps joins at step 3.
    cache = make_cache("contiguous-oracle", 64, max_seq_len=16)
    requests = trace((1, 2), (1, 1), arrivals=(0.0, 2.5))
    result = serve(cache, requests, step_duration=1.0, measure_memory=False)
    assert result.num_running.tolist() == [1, 1, 0, 1]
    assert not result.breakdowns.any()
    # Stopping at the last arrival runs steps 0..3 only.
    result = serve(make_cache("paged", 64, 16), requests, step_duration=1.0, stop_at_last_arrival=True)
    assert result.num_running.tolist() == [1, 1, 0, 1]


def test_bad_input():
    with pytest.raises(ValueError, match="allowed: contiguous-max"):
        make_cache("contiguous", 64)
    with pytest.raises(ValueError, match="never fit"):
        serve(make_cache("paged", 32, max_seq_len=64), trace((30, 10)))
    for block in (0, -16):
        with pytest.raises(ValueError, match="--block-size"):
            make_cache("paged", 64, block_size=block)
    with pytest.raises(ValueError, match="--kv-slots"):
        make_cache("paged", 8, block_size=16)
    # A step that does not advance time would never reach a later arrival: refused, not a hang.
    for step_duration in (0.0, -0.04, math.nan):
        with pytest.raises(ValueError, match="step_duration"):
            serve(make_cache("paged", 64, 16), trace((5, 5), (5, 5), arrivals=(0.0, 1.0)), step_duration)
    with pytest.raises(ValueError, match="--num-requests"):
        Sizes(num_requests=0)


EVERY_MAIN = [fragmentation.main, batching.main, block_size.main, timeline.main, run_all.main]


def case_id(value: object) -> str:
    """A test id that reads: the experiment's module and the options."""
    return value.__module__.rsplit(".", 1)[-1] if callable(value) else " ".join(value)


@pytest.mark.parametrize(
    "main, argv",
    [
        (batching.main, ["--step-duration", "0"]),
        (batching.main, ["--step-duration", "nan"]),
        (batching.main, ["--step-duration", "inf"]),  # every step at time inf: no request would ever wait
        (timeline.main, ["--step-duration", "-0.04"]),
        (timeline.main, ["--num-requests", "0"]),
        (fragmentation.main, ["--num-requests", "0"]),
        (fragmentation.main, ["--block-size", "0"]),
        (fragmentation.main, ["--block-size", "3"]),  # the paged cache takes powers of two
        (batching.main, ["--block-size", "12"]),
        (fragmentation.main, ["--rate", "0"]),
        (timeline.main, ["--rate", "-2"]),
        (batching.main, ["--rates", "2", "nan"]),
        (block_size.main, ["--block-sizes", "16", "-4"]),
        (block_size.main, ["--block-sizes", "16", "24"]),
        (fragmentation.main, ["--dataset", "lmsys"]),
        (timeline.main, ["--dataset", "missing.csv"]),
        (fragmentation.main, ["--max-seq-len", "1"]),
        (block_size.main, ["--jobs", "0"]),
        (timeline.main, ["--seed", "1.5"]),
        *((main, ["--seed", "-1"]) for main in EVERY_MAIN),
        *((main, ["--kv-slots", "x"]) for main in EVERY_MAIN),
        # The KV space cannot hold one request of the maximum length: checked against each system's cache.
        (fragmentation.main, ["--kv-slots", "100"]),  # Max's slab of 2048
        (timeline.main, ["--kv-slots", "2000", "--reservation", "oracle"]),  # an aligned block of 2048
        (block_size.main, ["--kv-slots", "2000"]),  # 31 blocks of 64 slots hold 1984 tokens
        (fragmentation.main, ["--kv-slots", "4096", "--max-seq-len", "4097"]),
        (run_all.main, ["--kv-slots", "100"]),  # checked for every experiment before the first runs
    ],
    ids=case_id,
)
def test_bad_options_stop_before_any_run(tmp_path, capsys, main, argv):
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path), "--quick", "--jobs", "1", *argv])
    assert stop.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert argv[0] in err
    assert err.startswith("usage:")
    message = err.strip().splitlines()[-1]  # "PROG: error: MESSAGE", after the usage lines
    assert "error:" in message and argv[0] in message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("main", EVERY_MAIN, ids=case_id)
def test_out_must_be_a_directory(tmp_path, capsys, main):
    not_a_directory = tmp_path / "figures"
    not_a_directory.write_text("")
    for out in (not_a_directory, not_a_directory / "sub"):
        with pytest.raises(SystemExit) as stop:
            main(["--out", str(out), "--quick", "--jobs", "1"])
        assert stop.value.code == 2
        assert "--out" in capsys.readouterr().err.strip().splitlines()[-1]
    assert [path.name for path in tmp_path.iterdir()] == ["figures"]


def test_batching_averages_until_the_last_arrival(tmp_path):
    # Long requests (100 output tokens) at 2 req/s: the drain after the last arrival would take
    # ~100 more steps. Step k is at k x 0.04 s and the last request joins at the first step at or
    # after its arrival, so the run has that step's index + 1 steps.
    lengths = tmp_path / "long.json"
    lengths.write_text("[[10, 100], [20, 100], [30, 100], [40, 100]]")
    sizes = Sizes(kv_slots=4096)
    last = make_trace(str(lengths), None, 2.0, seed=0)[-1].arrival_time
    steps = 0
    while steps * 0.04 < last:
        steps += 1
    row = batching.one_run(str(lengths), 2.0, "paged", sizes, 0, 0.04, 16)
    assert row["steps"] == steps + 1
    assert row["steps"] < 100
    result = serve(make_cache("paged", 4096), make_trace(str(lengths), None, 2.0, seed=0), 0.04,
                   measure_memory=False, stop_at_last_arrival=True)
    assert row["requests_batched"] == round(float(result.num_running.mean()), 2)


def test_timeline_times_are_seconds():
    # The hand trace of test_contiguous_max (3 steps) with 0.25 s steps: one row per step.
    sizes = Sizes(kv_slots=16, max_seq_len=8)
    rows = timeline.one_run("contiguous-max", trace((2, 3), (3, 2), (1, 1)), sizes, 0.25)
    assert [row["time_s"] for row in rows] == [0.0, 0.25, 0.5]
    assert [row["token_states"] for row in rows] == [31.25, 43.75, 31.25]  # 5, 7, 5 of 16
    assert [row["running"] for row in rows] == [2, 2, 2]
    assert [row["memory_bound"] for row in rows] == [1.0, 1.0, 0.0]  # C waits at steps 0-1
    # One request of 1 + 1199 tokens: admitted at step 0, leaves after step 1198, 1199 steps in
    # bins of ceil(1199 / 500) = 3 steps, i.e. 0.12 s apart; the last bin starts at step 1197.
    rows = timeline.one_run("paged", [Request(0, 0.0, 1, 1199)], Sizes(kv_slots=2048), 0.04)
    times = [row["time_s"] for row in rows]
    assert len(times) == 400
    assert times == pytest.approx([0.12 * k for k in range(400)])
    assert times[-1] < 1200 * 0.04


def test_paper_constants():
    # Written out from REFERENCE.md (paper Figure 2, Figure 13, Figure 18b).
    assert paper.FIGURE_2 == {
        "contiguous-max": {"token_states": 20.4, "reservation": 13.3, "internal_fragmentation": 57.3,
                           "external_fragmentation": 8.9},
        "contiguous-pow2": {"token_states": 26.8, "reservation": 17.9, "internal_fragmentation": 13.6,
                            "external_fragmentation": 41.6},
        "contiguous-oracle": {"token_states": 38.2, "reservation": 25.2, "internal_fragmentation": 0.0,
                              "external_fragmentation": 36.6},
        "paged": {"token_states": 96.3, "waste": 3.7},
    }
    assert paper.FIGURE_13 == {
        "sharegpt": (2.0, {"contiguous-max": 7.00, "contiguous-pow2": 9.81, "contiguous-oracle": 13.62,
                           "paged": 30.42}),
        "alpaca": (30.0, {"contiguous-max": 7.00, "contiguous-pow2": 43.24, "contiguous-oracle": 72.75,
                          "paged": 132.44}),
    }
    assert paper.FIGURE_18B_BEST_BLOCK_SIZES == {"sharegpt": (16, 128), "alpaca": (16, 32)}


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
        rows = list(csv.DictReader(f))
    assert len({(row["dataset"], row["system"]) for row in rows}) == 8  # two datasets x four systems
    # --quick is memory-bound for every dataset and system: no empty (NaN) averages.
    assert all(int(row["memory_bound_steps"]) > 0 for row in rows)
    assert not any(math.isnan(float(row[name])) for row in rows for name in fragmentation.CATEGORIES)
    assert {int(row["requests"]) for row in rows} == {QUICK.default_requests, 5 * QUICK.default_requests}
    with (tmp_path / "block_size.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert int(row["memory_bound_steps"]) > 0
        parts = float(row["reservation"]) + float(row["internal_fragmentation"]) + float(row["external_fragmentation"])
        assert float(row["waste"]) == pytest.approx(parts, abs=0.021)  # four roundings to 0.01


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
    # Without --rate every request arrives at time 0: the same run as rate inf, memory-bound
    # from its first step.
    sizes = Sizes(kv_slots=QUICK.kv_slots, num_requests=40)
    for row in rows:
        expected = fragmentation.one_run(str(lengths), row["system"], sizes, 0, math.inf, 16)
        assert int(row["steps"]) == expected["steps"]
        assert int(row["memory_bound_steps"]) == expected["memory_bound_steps"] > 0


def test_fragmentation_replays_a_lengths_file(tmp_path):
    # Without --num-requests a lengths file is replayed: one request per entry, in order.
    lengths = tmp_path / "mine.csv"
    lengths.write_text("prompt_len,output_len\n" + "".join(f"{p},{o}\n" for p, o in [(1500, 500)] * 3))
    fragmentation.main(["--out", str(tmp_path), "--quick", "--jobs", "1", "--dataset", str(lengths)])
    with (tmp_path / "fragmentation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(row["requests"]) for row in rows} == {3}
    # Max: 2 of the 3 requests of 2000 tokens fit in 4096 slots, the third waits their 500 steps.
    assert float(rows[0]["requests_batched"]) == 2.0
    assert int(rows[0]["memory_bound_steps"]) == 500
