"""Request workloads: how long prompts and outputs are, and when requests arrive.

The paper evaluates on two traces (Kwon et al., SOSP 2023, §6.1 and Figure 11): ShareGPT
(real ChatGPT conversations: mean prompt 161.31 tokens, mean output 337.99) and Alpaca
(GPT-3.5-written instructions: 19.31 and 58.45). The datasets cannot be downloaded here, so we
draw synthetic lengths with the same means, and requests arrive as a Poisson process, as in the
paper. A user can also bring their own (prompt, output) lengths from a CSV or JSON file: without
a number of requests the file is replayed in order, one request per line or entry; with one,
that many pairs are drawn from the file uniformly with replacement (seeded).

The length distribution is log-normal, drawn independently for the prompt and the output.
Text lengths are positive and right-skewed (many short requests, a long tail of long ones,
Figure 11), which is the log-normal's shape. The datasets' spread is not in the paper; we take a
coefficient of variation of 1 (standard deviation equal to the mean) before rounding, that is
sigma = sqrt(ln 2) ~= 0.83 of the underlying normal. Lengths are then post-processed as a
serving benchmark does: rounded to integers >= 1, the prompt capped at `max_seq_len - 1` and the
output cut so that prompt + output <= `max_seq_len` (2048, OPT's maximum). The normal's mean mu
is calibrated numerically so that the mean AFTER this post-processing is the target. Achieved
on one million requests (seed 0): ShareGPT prompt 161.5 / output 338.0 tokens (medians 114 /
243; 0.8% of requests hit the 2048 cap), Alpaca 19.3 / 58.5 (medians 14 / 41), all within 0.2%
of the paper's means. A small `max_seq_len` caps the lengths so much that no mu reaches the target
means; then a warning says by how much they miss.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

MAX_SEQ_LEN = 2048  # OPT's maximum sequence length, as in the paper's evaluation


@dataclass(frozen=True)
class Request:
    """One request of a trace: it arrives at `arrival_time` (seconds) with `prompt_len` prompt
    tokens and will generate exactly `output_len` tokens (the model is replaced by known lengths)."""

    request_id: int
    arrival_time: float
    prompt_len: int
    output_len: int

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class Dataset:
    """Target mean lengths of a dataset (paper Figure 11) and the log-normal spread we assume."""

    name: str
    mean_prompt_len: float
    mean_output_len: float
    sigma: float = math.sqrt(math.log(2.0))  # coefficient of variation 1


DATASETS = {
    "sharegpt": Dataset("sharegpt", mean_prompt_len=161.31, mean_output_len=337.99),
    "alpaca": Dataset("alpaca", mean_prompt_len=19.31, mean_output_len=58.45),
}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}, or a .csv/.json file of lengths"
        )
    return DATASETS[name]


def _round_prompt(x: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Real-valued prompt lengths -> integers in [1, max_seq_len - 1]."""
    return np.clip(np.rint(x), 1, max_seq_len - 1).astype(np.int64)


def _round_output(x: np.ndarray, prompt_lens: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Real-valued output lengths -> integers >= 1, cut so that prompt + output <= max_seq_len."""
    return np.minimum(np.clip(np.rint(x), 1, None).astype(np.int64), max_seq_len - prompt_lens)


def _solve_mu(target: float, mean_of: Callable[[float], float]) -> float:
    """Bisection for the mu at which mean_of(mu) (increasing in mu) equals target."""
    lo, hi = -5.0, math.log(MAX_SEQ_LEN) + 5.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_of(mid) < target else (lo, mid)
    return (lo + hi) / 2


@functools.cache
def _calibrated_mus(dataset: Dataset, max_seq_len: int) -> tuple[float, float, float, float]:
    """mu of the prompt and output log-normals such that the post-processed means hit the targets,
    and the means they achieve (which miss the targets when max_seq_len is small).

    The means are evaluated on a grid of 2^16 normal quantiles (a deterministic quadrature, so the
    calibration does not depend on any generator); the output grid is a fixed shuffle of the
    prompt grid, pairing the two independently. The output is calibrated given the prompts
    because the cap on prompt + output couples them."""
    n = 1 << 16
    z_prompt = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    z_output = np.random.default_rng(0).permutation(z_prompt)
    s = dataset.sigma
    mu_prompt = _solve_mu(
        dataset.mean_prompt_len, lambda mu: _round_prompt(np.exp(mu + s * z_prompt), max_seq_len).mean()
    )
    prompt_lens = _round_prompt(np.exp(mu_prompt + s * z_prompt), max_seq_len)
    mu_output = _solve_mu(
        dataset.mean_output_len,
        lambda mu: _round_output(np.exp(mu + s * z_output), prompt_lens, max_seq_len).mean(),
    )
    achieved = (
        float(prompt_lens.mean()),
        float(_round_output(np.exp(mu_output + s * z_output), prompt_lens, max_seq_len).mean()),
    )
    return mu_prompt, mu_output, *achieved


def sample_lengths(
    dataset: str, num_requests: int, rng: np.random.Generator, max_seq_len: int = MAX_SEQ_LEN
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `num_requests` (prompt_len, output_len) pairs of a dataset ("sharegpt" or "alpaca").
    Returns two int64 arrays; every length is >= 1 and prompt + output <= max_seq_len."""
    spec = get_dataset(dataset)
    _check_num_requests(num_requests)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (one prompt and one output token), got {max_seq_len}")
    mu_prompt, mu_output, *achieved = _calibrated_mus(spec, max_seq_len)
    targets = (spec.mean_prompt_len, spec.mean_output_len)
    if any(abs(a / t - 1) > 0.01 for a, t in zip(achieved, targets, strict=True)):
        warnings.warn(
            f"{spec.name} with max_seq_len={max_seq_len}: the lengths' means are {achieved[0]:.1f} (prompt) "
            f"and {achieved[1]:.1f} (output), not the paper's {targets[0]} and {targets[1]}: "
            "the cap on prompt + output cuts the long requests",
            stacklevel=2,
        )
    prompt_lens = _round_prompt(rng.lognormal(mu_prompt, spec.sigma, num_requests), max_seq_len)
    output_lens = _round_output(rng.lognormal(mu_output, spec.sigma, num_requests), prompt_lens, max_seq_len)
    return prompt_lens, output_lens


def poisson_arrivals(num_requests: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds) of a Poisson process of `rate` requests per second: exponential
    inter-arrival gaps with mean 1 / rate, the first request arriving one gap after time 0.
    rate = inf means every request arrives at time 0."""
    if not rate > 0:
        raise ValueError(f"rate must be a positive number of requests per second (or inf), got {rate}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    return np.cumsum(rng.exponential(1.0 / rate, num_requests))


def _check_num_requests(num_requests: object) -> None:
    if isinstance(num_requests, bool) or not isinstance(num_requests, int | np.integer) or num_requests < 0:
        raise ValueError(f"num_requests must be an integer >= 0, got {num_requests!r}")


def is_lengths_file(workload: str) -> bool:
    """Whether a workload names a .csv/.json file of lengths (rather than a dataset)."""
    return Path(workload).suffix.lower() in (".csv", ".json")


def workload_lengths(
    workload: str, num_requests: int | None, rng: np.random.Generator, max_seq_len: int = MAX_SEQ_LEN
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_len, output_len) arrays of the requests of a workload: `num_requests` draws of a
    synthetic dataset ("sharegpt", "alpaca"), or the pairs of a .csv/.json file of lengths (see
    `load_lengths`): with num_requests=None the whole file in its order (a replay), otherwise
    `num_requests` pairs drawn from it uniformly with replacement."""
    if is_lengths_file(workload):
        prompt_lens, output_lens = load_lengths(workload, max_seq_len)
        if num_requests is None:
            return prompt_lens, output_lens
        _check_num_requests(num_requests)
        picks = rng.integers(len(prompt_lens), size=num_requests)
        return prompt_lens[picks], output_lens[picks]
    if num_requests is None:
        raise ValueError(f"num_requests is needed for the synthetic dataset {workload!r}")
    return sample_lengths(workload, num_requests, rng, max_seq_len)


def make_trace(
    workload: str, num_requests: int | None, rate: float, seed: int = 0, max_seq_len: int = MAX_SEQ_LEN
) -> list[Request]:
    """A seeded trace: lengths of a workload (see `workload_lengths`; num_requests=None replays a
    lengths file in order), Poisson arrivals at `rate`.
    The lengths are drawn before the arrival gaps from one generator, so traces with the same
    seed and different rates hold the same requests, only spaced differently in time."""
    rng = np.random.default_rng(seed)
    prompt_lens, output_lens = workload_lengths(workload, num_requests, rng, max_seq_len)
    arrival_times = poisson_arrivals(len(prompt_lens), rate, rng)
    return [
        Request(i, float(t), int(p), int(o))
        for i, (t, p, o) in enumerate(zip(arrival_times, prompt_lens, output_lens, strict=True))
    ]


def _csv_length(x: str) -> int:
    """An integer length from a CSV field: "12" is 12; "3.0", "3.5" and "abc" raise ValueError."""
    if not isinstance(x, str) or not x.strip().isdigit():
        raise ValueError(f"{x!r} is not an integer")
    return int(x)


def _json_length(x: object) -> int:
    """An integer length from a JSON value: 12 is 12; 3.0, 3.5, "12" and true raise ValueError."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{x!r} is not an integer")
    return x


def load_lengths(path: str | Path, max_seq_len: int = MAX_SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """A user's own (prompt_len, output_len) pairs, from

    - a CSV file with a header row naming the columns `prompt_len` and `output_len`, or
    - a JSON file holding a list of [prompt_len, output_len] pairs or of objects with those keys.

    Every length must be an integer (written without a decimal point; a JSON string such as "12"
    is not a number) >= 1, and prompt_len + output_len <= max_seq_len."""
    path = Path(path)
    allowed = "a .csv with columns prompt_len,output_len or a .json list of [prompt_len, output_len] pairs"
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                pairs = [(_csv_length(row["prompt_len"]), _csv_length(row["output_len"]))
                         for row in csv.DictReader(f)]
        elif path.suffix.lower() == ".json":
            items = json.loads(path.read_text())
            rows = [(x["prompt_len"], x["output_len"]) if isinstance(x, dict) else tuple(x) for x in items]
            pairs = [(_json_length(p), _json_length(o)) for p, o in rows]
        else:
            raise ValueError(f"unsupported file type {path.suffix!r}")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read lengths from {path}: {e!r}; expected {allowed}") from e
    if not pairs:
        raise ValueError(f"no lengths in {path}; expected {allowed}")
    for i, (p, o) in enumerate(pairs):
        if p < 1 or o < 1 or p + o > max_seq_len:
            raise ValueError(
                f"{path}, entry {i}: prompt_len={p}, output_len={o}; "
                f"both must be >= 1 and their sum <= max_seq_len={max_seq_len}"
            )
    prompt_lens, output_lens = zip(*pairs, strict=True)
    return np.array(prompt_lens, dtype=np.int64), np.array(output_lens, dtype=np.int64)
