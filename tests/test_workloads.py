import json

import numpy as np
import pytest

from minipaged.workloads import (
    DATASETS,
    Request,
    load_lengths,
    make_trace,
    poisson_arrivals,
    sample_lengths,
)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_means_match_the_paper(name):
    # 400k requests: the standard error of the mean is ~0.15% (coefficient of variation ~1).
    prompt, output = sample_lengths(name, 400_000, np.random.default_rng(0))
    spec = DATASETS[name]
    assert prompt.mean() == pytest.approx(spec.mean_prompt_len, rel=0.01)
    assert output.mean() == pytest.approx(spec.mean_output_len, rel=0.01)


@pytest.mark.parametrize("max_seq_len", [2048, 300])
@pytest.mark.filterwarnings("ignore:sharegpt with max_seq_len=300")
def test_lengths_are_positive_integers_within_the_cap(max_seq_len):
    prompt, output = sample_lengths("sharegpt", 100_000, np.random.default_rng(1), max_seq_len)
    assert prompt.dtype == output.dtype == np.int64
    assert prompt.min() >= 1 and output.min() >= 1
    assert (prompt + output).max() <= max_seq_len
    assert (prompt + output).max() == max_seq_len  # the long tail does reach the cap


def test_seeding_is_reproducible():
    a = make_trace("alpaca", 50, rate=3.0, seed=7)
    assert a == make_trace("alpaca", 50, rate=3.0, seed=7)
    assert a != make_trace("alpaca", 50, rate=3.0, seed=8)
    # Same seed, other rate: the same requests, only spaced differently in time.
    b = make_trace("alpaca", 50, rate=6.0, seed=7)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in b]
    assert [r.arrival_time / 2 for r in a] == pytest.approx([r.arrival_time for r in b])
    # Rate inf draws no gaps at all; the lengths are still the same (they are drawn first).
    c = make_trace("alpaca", 50, rate=float("inf"), seed=7)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in c]
    assert all(r.arrival_time == 0.0 for r in c)
    # The first request arrives one gap after time 0, not at 0.
    assert a[0].arrival_time > 0


def test_poisson_arrivals():
    times = poisson_arrivals(200_000, rate=4.0, rng=np.random.default_rng(2))
    gaps = np.diff(times, prepend=0.0)
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.01)
    assert gaps.std() == pytest.approx(0.25, rel=0.02)  # exponential: std == mean
    assert (poisson_arrivals(5, float("inf"), np.random.default_rng(0)) == 0).all()


def test_request_fields():
    r = make_trace("sharegpt", 3, rate=1.0, seed=0)[2]
    assert isinstance(r, Request) and r.request_id == 2
    assert r.final_len == r.prompt_len + r.output_len


def test_load_lengths_csv_and_json(tmp_path):
    csv_path = tmp_path / "lengths.csv"
    csv_path.write_text("prompt_len,output_len\n10,5\n3,100\n")
    json_pairs = tmp_path / "pairs.json"
    json_pairs.write_text(json.dumps([[10, 5], [3, 100]]))
    json_objects = tmp_path / "objects.json"
    json_objects.write_text(json.dumps([{"prompt_len": 10, "output_len": 5}, {"prompt_len": 3, "output_len": 100}]))
    for path in (csv_path, json_pairs, json_objects):
        prompt, output = load_lengths(path)
        assert prompt.tolist() == [10, 3] and output.tolist() == [5, 100]
    # A file is a workload too: without a number of requests it is replayed in order...
    trace = make_trace(str(csv_path), None, rate=2.0, seed=0)
    assert [(r.request_id, r.prompt_len, r.output_len) for r in trace] == [(0, 10, 5), (1, 3, 100)]
    assert 0 < trace[0].arrival_time < trace[1].arrival_time
    # ... and with one, that many of its pairs are drawn with replacement.
    trace = make_trace(str(csv_path), 50, rate=2.0, seed=0)
    assert len(trace) == 50
    assert {(r.prompt_len, r.output_len) for r in trace} == {(10, 5), (3, 100)}
    with pytest.raises(ValueError, match="num_requests"):
        make_trace(str(csv_path), -1, rate=2.0, seed=0)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", "input,output\n1,2\n", "prompt_len,output_len"),
        ("a.csv", "prompt_len,output_len\n1,x\n", "prompt_len,output_len"),
        ("a.csv", "prompt_len,output_len\n", "no lengths"),
        ("a.json", "[[1, 2], [3]]", "pairs"),
        ("a.json", "[[1.5, 2]]", "pairs"),
        ("a.json", "[[3.0, 2]]", "pairs"),  # integers only, as in a CSV
        ("a.json", '[["12", "7"]]', "pairs"),  # a string is not a number
        ("a.json", "[[true, 2]]", "pairs"),
        ("a.csv", "prompt_len,output_len\n3.0,2\n", "prompt_len,output_len"),
        ("a.json", "{not json", "pairs"),
        ("a.json", "[[0, 2]]", ">= 1"),
        ("a.json", "[[2000, 49]]", "max_seq_len=2048"),
        ("a.txt", "1,2", "unsupported file type"),
    ],
)
def test_load_lengths_rejects_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_lengths(path)


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="allowed: alpaca, sharegpt"):
        sample_lengths("lmsys", 10, rng)
    for rate in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            poisson_arrivals(10, rate, rng)
    with pytest.raises(ValueError, match="num_requests"):
        sample_lengths("alpaca", -1, rng)
    with pytest.raises(ValueError, match="num_requests"):
        make_trace("sharegpt", None, rate=1.0)


def test_a_small_max_seq_len_warns_that_the_means_are_missed():
    with pytest.warns(UserWarning, match="max_seq_len=300"):
        sample_lengths("sharegpt", 10, np.random.default_rng(0), max_seq_len=300)
