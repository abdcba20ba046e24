"""A request's state as the engine sees it (paper §4.4, §4.5, §5).

A request becomes a ``SequenceGroup`` of one or more ``Sequence``s. A sequence is a prompt and
its generated tokens in one list, with how many of them the KV cache already holds
(``num_cached``). A plain request is a group of one; parallel sampling (``n > 1``) and beam
search grow a group to ``n`` or ``beam_width`` sequences by *forking* (§4.4): the members share
the prompt's blocks, and the scheduler treats the group as one unit, admitted, preempted and
resumed whole. The group says where it stands: waiting for memory, running (its K/V in the
cache), swapped (its K/V in CPU memory) or finished. The scheduler moves groups between these
states; the model runner reads their tokens; the engine appends what was sampled.

A sequence's K/V always covers a prefix of its tokens: after a step, the cache holds
``num_cached`` tokens, and when ``num_cached == len(token_ids)`` the step has just produced
the logits of the next token. A preempted sequence (recompute, §4.5) keeps its tokens but
drops its K/V (``num_cached = 0``): it comes back as a prompt of everything it had.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from torch import Tensor

# A token sampled on the GPU that the host has not read back yet. With asynchronous scheduling
# (``minipaged.engine.llm``) a sequence's last token can be PENDING while the next step is
# scheduled; the runner takes its value from ``PendingTokens`` on the device, and the engine
# writes it in when it arrives.
PENDING = -1


@dataclass(frozen=True)
class PendingTokens:
    """The tokens of the step before, still on the device: sequence ``seq_id``'s PENDING token is
    ``tokens[rows[seq_id]]``."""

    tokens: Tensor  # int64 [S]
    rows: dict[int, int]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop (vLLM's names and meanings).

    ``temperature=0`` is greedy. ``top_k=-1`` and ``top_p=1`` keep every token. ``seed`` makes a
    sample reproducible whatever batch it runs in (see ``minipaged.engine.sampler``); None draws one.
    A sequence stops at ``max_tokens`` generated tokens, at the model's end-of-sequence token
    (unless ``ignore_eos``), at any of ``stop_token_ids``, or when its text ends in one of ``stop``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Validate at the door: every field a user can get wrong says what is allowed.
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

        positive_int("max_tokens", self.max_tokens)
        positive_int("n", self.n)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.n > 1 and self.temperature == 0:
            # Greedy samples are n copies of one sequence: almost surely a mistake, so say so.
            raise ValueError(f"n={self.n} greedy samples would be {self.n} identical copies: use temperature > 0 "
                             f"for n different samples, or LLM.beam_search for the n most likely sequences")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (all tokens) or an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search as transformers' ``generate(num_beams=beam_width, do_sample=False,
    early_stopping=False, length_penalty=..., max_new_tokens=max_tokens)`` does it (see
    ``minipaged.engine.beam_search``). ``ignore_eos`` runs every beam to ``max_tokens``."""

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    ignore_eos: bool = False
    # What the engine reads of any request's parameters: beam search stops only at EOS or its length.
    stop_token_ids: tuple[int, ...] = field(default=(), init=False)
    stop: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")

    @property
    def n(self) -> int:
        return self.beam_width


class Status(enum.Enum):
    WAITING = "waiting"  # not in the cache: new, or preempted by recompute
    RUNNING = "running"  # its K/V is in the cache
    SWAPPED = "swapped"  # its K/V is in CPU memory (preempted by swap)
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request: ``token_ids`` holds the prompt, then every generated token."""

    seq_id: int
    token_ids: list[int]
    params: SamplingParams | BeamSearchParams
    seed: int  # the request's seed (given, or drawn for it); sample i draws with child_seed(seed, i)
    max_len: int  # prompt + max_tokens, capped at the model's length: it never holds more
    num_prompt_tokens: int
    index: int = 0  # which of the request's samples (or beams) this is
    num_cached: int = 0  # tokens whose K/V the cache holds (0 while waiting)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" or "length"
    text: str = ""  # the generated text, kept only when stop strings need it

    def fork(self, seq_id: int, index: int = 0) -> Sequence:
        """A copy under a new id (its K/V is the cache's business: ``KVCache.fork``)."""
        return Sequence(seq_id, list(self.token_ids), self.params, self.seed, self.max_len, self.num_prompt_tokens,
                        index, self.num_cached, self.cumulative_logprob)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncached(self) -> int:
        """Tokens still to be fed to the model before it yields the next token."""
        return len(self.token_ids) - self.num_cached



@dataclass(eq=False)
class SequenceGroup:
    """One request: its live sequences (``seqs``), scheduled together, and what it has finished.

    ``width`` is the most sequences it will hold at once (``n`` or ``beam_width``): the scheduler
    keeps that many seats in the batch for it from admission on. The engine changes a group
    after each step (it forks children, drops finished samples and losing beams); the scheduler
    brings the cache up to date at the start of the next step (``forks`` made, ``dropped``
    freed), so that a fork that finds no memory preempts like any other growth.
    """

    request_id: int
    seqs: list[Sequence]
    params: SamplingParams | BeamSearchParams
    arrival_time: float = 0.0
    status: Status = Status.WAITING
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, child): not yet in the cache
    dropped: list[Sequence] = field(default_factory=list)  # left ``seqs``, still in the cache until the next step
    finished: list[Sequence] = field(default_factory=list)  # completed samples, or beam hypotheses (best first)
    # Fixed by ``params``; plain attributes, not properties, because every step reads them per group.
    width: int = field(init=False)
    is_beam_search: bool = field(init=False)

    def __post_init__(self) -> None:
        self.width, self.is_beam_search = self.params.n, isinstance(self.params, BeamSearchParams)
