"""A request's state as the engine sees it (paper §4.5, §5).

A request becomes a ``Sequence``: its prompt and generated tokens in one list, how many of
them the KV cache already holds (``num_cached``), and where it stands: waiting for memory,
running (its K/V in the cache), swapped (its K/V in CPU memory) or finished. The scheduler
moves sequences between these states; the model runner reads their tokens; nothing else
changes them.

A sequence's K/V always covers a prefix of its tokens: after a step, the cache holds
``num_cached`` tokens, and when ``num_cached == len(token_ids)`` the step has just produced
the logits of the next token. A preempted sequence (recompute, §4.5) keeps its tokens but
drops its K/V (``num_cached = 0``): it comes back as a prompt of everything it had.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


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
        if self.n != 1:
            raise ValueError(f"n={self.n}: parallel sampling (n > 1) is not supported yet; use n=1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
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
    params: SamplingParams
    seed: int  # the sampler's seed (the request's, or one drawn for it)
    max_len: int  # prompt + max_tokens, capped at the model's length: it never holds more
    arrival_time: float = 0.0
    num_prompt_tokens: int = field(init=False)
    num_cached: int = 0  # tokens whose K/V the cache holds (0 while waiting)
    status: Status = Status.WAITING
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" or "length"
    text: str = ""  # the generated text, kept only when stop strings need it

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncached(self) -> int:
        """Tokens still to be fed to the model before it yields the next token."""
        return len(self.token_ids) - self.num_cached

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
