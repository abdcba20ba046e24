"""Beam search on shared blocks (paper §4.4), step for step as transformers does it.

Beam search keeps the ``beam_width`` most likely partial outputs of one prompt. Each step every
beam proposes its continuations, and the best ``beam_width`` of all of them become the next
beams: a beam chosen twice is *forked*, a beam chosen by no one is *dropped*. The paper's point
is what that does to memory: the beams are sequences in one group whose block tables share
every block of their common history, so a fork copies no K/V (only a partly filled last block,
by copy-on-write, when a child first writes into it), and a dropped beam only lowers reference
counts. ``LLMEngine`` applies this module's decisions through ``KVCache.fork`` and ``free`` (by
way of the scheduler) and the next step's ``append_slots``; this module touches no memory.

It reproduces transformers' ``generate(num_beams=k, num_return_sequences=k, do_sample=False)``
with its defaults ``early_stopping=False`` and ``length_penalty`` as given:

* candidates: the ``max(2, 1 + number of EOS ids) * k`` best (beam, token) pairs by cumulative
  log-probability (float32, ``log_softmax`` of the raw logits);
* a candidate *ends* when its token is an EOS id, or when it reaches ``max_tokens`` (or the
  model's length); the best ``k`` candidates that do not end are the next beams;
* among the ``k`` best candidates, those that end become finished hypotheses scored
  ``cumulative_logprob / generated_length ** length_penalty`` (EOS counted); the ``k`` best
  hypotheses are kept;
* the search stops when no beam is left, or when ``k`` hypotheses exist and the best beam's
  score at its current length cannot beat the worst of them (``early_stopping=False``'s rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Candidate:
    """A beam extended by one token: ``parent`` indexes the beams it came from."""

    parent: int
    token: int
    cumulative_logprob: float


@dataclass(frozen=True)
class BeamStep:
    """One step's decisions for one request."""

    beams: list[Candidate]  # the next beams, best first (empty when every candidate ended)
    ended: list[tuple[Candidate, float]]  # new finished hypotheses with their length-penalized scores


def penalized(cumulative_logprob: float, num_generated: int, length_penalty: float) -> float:
    """A hypothesis' score, computed in float32 as transformers does."""
    return float(torch.tensor(cumulative_logprob, dtype=torch.float32) / (num_generated ** length_penalty))


def beam_step(
    logprobs: Tensor,
    beam_logprobs: list[float],
    *,
    beam_width: int,
    num_generated: int,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    length_penalty: float,
) -> BeamStep:
    """The next beams and the hypotheses that end, from each live beam's next-token
    ``logprobs`` (float32 ``[B, V]``, ``log_softmax`` of the logits) and cumulative log-probability.

    ``num_generated`` tokens are generated so far by every beam (beams move in lockstep).
    """
    vocab = logprobs.shape[-1]
    totals = logprobs + torch.tensor(beam_logprobs, dtype=torch.float32, device=logprobs.device)[:, None]  # [B, V]
    num_candidates = min(max(2, 1 + len(eos_token_ids)) * beam_width, totals.numel())
    top, flat = totals.flatten().topk(num_candidates)
    length = num_generated + 1  # of every candidate
    beams, ended = [], []
    for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist())):
        candidate = Candidate(index // vocab, index % vocab, score)
        if candidate.token in eos_token_ids or length >= max_new_tokens:
            if rank < beam_width:  # only the k best candidates may finish
                ended.append((candidate, penalized(score, length, length_penalty)))
        elif len(beams) < beam_width:
            beams.append(candidate)
    return BeamStep(beams, ended)


def is_done(best_beam_logprob: float | None, hypothesis_scores: list[float], *, beam_width: int,
            num_generated: int, length_penalty: float) -> bool:
    """Stop when no beam is left, or ``beam_width`` hypotheses exist and the best beam, scored at
    its current length ``num_generated``, would not beat the worst of them."""
    if best_beam_logprob is None:
        return True
    if len(hypothesis_scores) < beam_width:
        return False
    return penalized(best_beam_logprob, num_generated, length_penalty) <= min(hypothesis_scores)
