"""The sampler: greedy is argmax, the batched version equals its row-by-row reference, and the
counter-based noise makes a seeded draw independent of the batch it runs in."""

import pytest
import torch

from minipaged.engine.sampler import SamplingBatch, reference_sample, sample, uniform_noise


def batch_of(rows: list[dict], vocab: int) -> SamplingBatch:
    def column(key, default, dtype):
        return torch.tensor([row.get(key, default) for row in rows], dtype=dtype)

    return SamplingBatch(
        temperatures=column("temperature", 1.0, torch.float32),
        top_ks=column("top_k", vocab, torch.int64),
        top_ps=column("top_p", 1.0, torch.float32),
        seeds=column("seed", 0, torch.int64),
        positions=column("position", 0, torch.int64),
    )


ROWS = [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=1, position=5),
    dict(temperature=0.7, top_k=5, seed=2, position=9),
    dict(temperature=1.3, top_p=0.8, seed=3, position=1),
    dict(temperature=1.0, top_k=20, top_p=0.5, seed=4, position=100),
]


def test_batched_sampling_equals_the_row_by_row_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = torch.randn(len(ROWS), 50, generator=gen) * 3
        rows = [row | {"position": row.get("position", 0) + trial} for row in ROWS]
        tokens, logprobs = sample(logits, batch_of(rows, 50))
        ref_tokens, ref_logprobs = reference_sample(logits, batch_of(rows, 50))
        assert tokens.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logprobs, ref_logprobs)


def test_greedy_is_argmax_and_reports_the_models_logprob():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    for batch in (None, batch_of([dict(temperature=0.0)] * 4, 30)):  # the all-greedy path, and row by row
        tokens, logprobs = sample(logits, batch)
        assert tokens.tolist() == logits.argmax(-1).tolist()
        torch.testing.assert_close(logprobs, logits.log_softmax(-1).max(-1).values)


def test_a_vocabulary_of_one_token_draws_it_with_log_probability_zero():
    """The memory charts' stand-in model: greedy or not, token 0, certain."""
    logits = torch.randn(3, 1)
    for batch in (None, batch_of(ROWS[:3], 1)):
        tokens, logprobs = sample(logits, batch)
        assert tokens.tolist() == [0, 0, 0] and logprobs.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("setting", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_or_a_tiny_nucleus_leaves_only_the_most_likely_token(setting):
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(2))
    rows = [dict(temperature=1.0, seed=s, position=s, **setting) for s in range(8)]
    assert sample(logits, batch_of(rows, 40))[0].tolist() == logits.argmax(-1).tolist()


def test_a_seeded_row_draws_the_same_token_in_any_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 100, generator=gen)
    rows = [dict(temperature=1.0, seed=10 + i, position=7) for i in range(6)]
    alone = [sample(logits[i:i + 1], batch_of(rows[i:i + 1], 100))[0].item() for i in range(6)]
    order = [4, 2, 0, 5, 1, 3]
    shuffled = sample(logits[order], batch_of([rows[i] for i in order], 100))[0].tolist()
    assert shuffled == [alone[i] for i in order]


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4)
    rows = dict(temperatures=torch.ones(n), top_ks=torch.full((n,), 4), top_ps=torch.ones(n),
                seeds=torch.full((n,), 42, dtype=torch.int64), positions=torch.arange(n))
    tokens, _ = sample(logits, SamplingBatch(**rows))
    frequencies = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)


def test_noise_is_uniform_and_differs_between_seeds_and_positions():
    u = uniform_noise(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), 4096)
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.02
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
