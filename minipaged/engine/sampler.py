"""Picking the next token from the logits: greedy, temperature, top-k, top-p, seeded.

``sample`` is a pure function of the logits and per-row settings, batched over the whole step.
Its randomness is *counter-based*: the noise for a row is a hash of (the request's seed, the
position of the token being sampled, the vocabulary index). So a seeded request draws the same
tokens whatever else runs in its batch, on whichever cache, and after a preemption (§4.5): the
engine's outputs never depend on scheduling. (A ``torch.Generator`` per request would need one
call per row per step.)

Sampling with noise: with ``E_i ~ Exponential(1)`` independent, ``argmax_i p_i / E_i`` is a draw
from ``p`` (the "exponential race", equivalent to the Gumbel-max trick), so one argmax serves
greedy and random rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minipaged import ops
from minipaged.engine.sequence import Sequence
from minipaged.ops.metadata import to_device

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row settings of one step's sampling, on the logits' device."""

    temperatures: Tensor  # float32 [B]; 0 = greedy
    top_ks: Tensor  # int64 [B]; the vocabulary size = no limit
    top_ps: Tensor  # float32 [B]; 1 = no limit
    seeds: Tensor  # int64 [B]
    positions: Tensor  # int64 [B]: the position of the token being sampled (its index in the sequence)


def sampling_batch(rows: list[tuple[Sequence, int]], vocab_size: int, device: torch.device) -> SamplingBatch | None:
    """The settings of rows ``(sequence, sample index)`` on ``device`` in one copy (each row
    samples the token at position ``len(sequence.token_ids)``); None when every row is greedy
    (checked first: most steps, nothing else is done)."""
    if all(seq.params.temperature == 0 for seq, _ in rows):
        return None
    params = [seq.params for seq, _ in rows]
    columns = to_device([  # float64 holds every seed (< 2**31) and position exactly
        *[p.temperature for p in params],
        *[p.top_k if p.top_k > 0 else vocab_size for p in params],
        *[p.top_p for p in params],
        *[child_seed(seq.seed, index) for seq, index in rows],
        *[len(seq.token_ids) for seq, _ in rows],
    ], torch.float64, device).view(5, len(rows))
    temperatures, top_ks, top_ps, seeds, positions = columns
    return SamplingBatch(temperatures.float(), top_ks.long(), top_ps.float(), seeds.long(), positions.long())


def child_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded ``seed`` (parallel sampling, n > 1):
    sample 0 keeps the request's seed, so ``n=1`` draws what it always drew."""
    if index == 0:
        return seed
    return int(_hash32(torch.tensor(seed ^ (index * 0x9E3779B1 & _MASK32)))) & 0x7FFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (xor-shift-multiply, as in C. Wellons' hash prospector) on int64
    tensors holding values < 2**32; both multipliers are < 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """float32 ``[B, V]`` in (0, 1): a function of (seed, position, vocabulary index) only."""
    row = _hash32((_hash32(seeds & _MASK32) ^ (positions * 0x9E3779B1)) & _MASK32)  # [B]
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32((row[:, None] ^ (vocab[None, :] * 0x85EBCA77 & _MASK32)) & _MASK32)  # [B, V]
    return ((bits >> 8).to(torch.float32) + 0.5) / 2**24  # 24 random bits, never 0 or 1


def sample(logits: Tensor, batch: SamplingBatch | None) -> tuple[Tensor, Tensor]:
    """Next tokens ``int64 [B]`` and their log-probabilities ``float32 [B]`` from ``logits [B, V]``
    in any float dtype; ``batch=None``: every row greedy (``ops.greedy_sample``, one kernel that
    reads the logits once: no noise, no sort, no settings to copy to the GPU).

    The log-probability is that of the model's own distribution (``log_softmax`` of the raw
    logits in float32, as transformers' beam scores and vLLM's default logprobs): settings that
    reshape the distribution change which token is drawn, not how its probability is reported.
    (The greedy kernel sums in another order than ``log_softmax``: a greedy row's log-probability
    may differ in the last float32 bits between an all-greedy batch and a mixed one.)
    """
    # One token to choose: the memory charts' stand-in model, whose thousands of steps would each
    # launch the greedy kernel (under the CPU interpreter, ~ms a launch) to find token 0.
    if logits.shape[-1] == 1:
        zeros = torch.zeros(logits.shape[0], device=logits.device)
        return zeros.long(), zeros
    if batch is None:
        return ops.greedy_sample(logits)
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = batch.temperatures == 0
    scaled = logits / torch.where(greedy, 1.0, batch.temperatures)[:, None]
    scaled = _top_k_top_p(scaled, batch.top_ks, batch.top_ps)
    probs = torch.softmax(scaled, dim=-1)
    exponential = -torch.log(uniform_noise(batch.seeds, batch.positions, logits.shape[-1]))
    drawn = (probs / exponential).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def _top_k_top_p(logits: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """Mask (to -inf) every token outside the ``top_k`` most likely and outside the smallest set
    whose probability reaches ``top_p`` (the most likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    outside = rank[None, :] >= top_ks[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # A token is outside the nucleus when the tokens before it already reach top_p.
    outside |= (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def reference_sample(logits: Tensor, batch: SamplingBatch | None) -> tuple[Tensor, Tensor]:
    """``sample`` one row at a time, written out plainly (the spec the tests compare against)."""
    tokens, logprobs = [], []
    for row in range(logits.shape[0]):
        x = logits[row].float()
        log_p = torch.log_softmax(x, dim=-1)
        temperature = 0.0 if batch is None else float(batch.temperatures[row])
        if temperature == 0:
            token = int(x.argmax())
        else:
            x = x / temperature
            keep = torch.ones_like(x, dtype=torch.bool)
            order = x.argsort(descending=True)
            keep[order[int(batch.top_ks[row]):]] = False
            p_sorted = x[order].softmax(-1)
            cumulative_before = p_sorted.cumsum(-1) - p_sorted
            keep[order[cumulative_before >= float(batch.top_ps[row])]] = False
            p = torch.where(keep, x, float("-inf")).softmax(-1)
            u = uniform_noise(batch.seeds[row:row + 1], batch.positions[row:row + 1], x.shape[0])[0]
            token = int((p / -torch.log(u)).argmax())
        tokens.append(token)
        logprobs.append(float(log_p[token]))
    return torch.tensor(tokens), torch.tensor(logprobs)
