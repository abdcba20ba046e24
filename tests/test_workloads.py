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
    # A file is a workload too: its pairs are drawn with replacement.
    trace = make_trace(str(csv_path), 50, rate=2.0, seed=0)
    assert {(r.prompt_len, r.output_len) for r in trace} == {(10, 5), (3, 100)}


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", "input,output\n1,2\n", "prompt_len,output_len"),
        ("a.csv", "prompt_len,output_len\n1,x\n", "prompt_len,output_len"),
        ("a.csv", "prompt_len,output_len\n", "no lengths"),
        ("a.json", "[[1, 2], [3]]", "pairs"),
        ("a.json", "[[1.5, 2]]", "pairs"),
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
