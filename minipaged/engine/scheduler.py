"""THE scheduler: continuous batching over any KV cache, with preemption (paper §4.5, §5).

Every step (one forward pass of the model) the scheduler decides which sequences run and how
many of their tokens they feed, and makes room for those tokens in the cache. It touches no
tensors: it returns a plain plan, and it sees the cache only through the ``KVCache``
interface, so the same code schedules the paged and the contiguous cache, and the same code
serves a real transformer (``LLM``) and the known-lengths stand-in of the memory charts.

One step, in this order (as vLLM's scheduler, and Orca's iteration-level scheduling):

1. **Running sequences** (oldest first) each feed their next token (decode), or their next
   chunk of prompt (chunked prefill). Each needs room for those tokens (``append_slots``). When
   the cache has none, the *newest* running sequence is preempted (§4.5: all-or-nothing, the
   latest-arrived first) until there is room or the sequence preempted itself:
   * ``recompute``: its memory is freed and it goes back to the front of the waiting queue, to
     be prefilled again from every token it had (prompt + generated);
   * ``swap``: its K/V moves to the CPU pool (falling back to recompute when that is full) and
     it waits in the swapped queue.
2. **Swapped sequences** come back (oldest first) when no one was preempted this step.
3. **Waiting sequences** are admitted first come, first served while the cache can allocate
   them, the batch has room (``max_num_seqs``) and the step has tokens left
   (``max_num_batched_tokens``); nothing overtakes the head of the queue. A prompt longer than
   what is left of the step's tokens is admitted with its first chunk (chunked prefill).

A sequence samples its next token in a step whose tokens reach the end of its ``token_ids``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from minipaged.engine.sequence import Sequence, Status
from minipaged.kv import KVCache, KVCacheFull

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class ScheduledSequence:
    """A sequence in this step's batch, feeding its ``num_new_tokens`` tokens that end at
    ``seq.num_cached`` (room for them is already made in the cache)."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Does this step yield the sequence's next token (its tokens are all in the cache now)?"""
        return self.seq.num_cached == len(self.seq.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step: who runs with how many tokens, and what happened to memory."""

    scheduled: list[ScheduledSequence]  # running sequences first (oldest first), then admitted ones
    num_preempted: int

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode(self) -> bool:
        """One token per sequence: the shape the decode kernel and CUDA graphs serve."""
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    """Queues of waiting, running and swapped sequences over one KV cache."""

    def __init__(
        self, cache: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int, preemption_mode: str = "recompute"
    ) -> None:
        assert preemption_mode in PREEMPTION_MODES, preemption_mode  # validated by the caller
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status is Status.WAITING and seq.num_cached == 0
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done: its memory goes back to the cache."""
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.status = Status.FINISHED

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted_before = self.num_preemptions

        # 1. Running sequences, oldest first; make room by preempting the newest. (Asking
        #    ``append_slots`` and catching KVCacheFull, which leaves the cache unchanged, costs one
        #    look at the block table where ``can_append`` first would cost two: this loop runs for
        #    every sequence at every step.)
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncached, budget)
            try:
                scheduled.append(self._append(seq, num_new))
            except KVCacheFull:
                self._preempt(self.running.pop())  # the newest; if that was seq itself, the loop ends
                continue
            budget -= num_new
            index += 1

        # 2. Swapped sequences come back while nothing needs preempting.
        while self.swapped and self.num_preemptions == preempted_before and budget > 0 \
                and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            num_new = min(seq.num_uncached, budget)
            try:
                self.cache.swap_in([seq.seq_id])
            except KVCacheFull:
                break
            if not self.cache.can_append(seq.seq_id, num_new):
                self.cache.swap_out([seq.seq_id])  # no room to grow after all: leave it swapped
                break
            self.swapped.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(self._append(seq, num_new))
            budget -= num_new

        # 3. Waiting sequences, first come first served, while they fit.
        while self.waiting and not self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = min(len(seq.token_ids), budget)
            token_ids = seq.token_ids[:num_tokens] if self.cache.uses_token_ids else None
            if not self.cache.can_allocate(num_tokens, seq.max_len, token_ids):
                break
            num_cached = self.cache.allocate(seq.seq_id, num_tokens, seq.max_len, token_ids)
            self.waiting.popleft()
            seq.status, seq.num_cached = Status.RUNNING, num_tokens
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_tokens - num_cached))
            budget -= num_tokens - num_cached
        return SchedulerOutput(scheduled, self.num_preemptions - preempted_before)

    def _append(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        """Room in the cache for a running sequence's next ``num_new`` tokens."""
        start = seq.num_cached
        token_ids = seq.token_ids[start:start + num_new] if self.cache.uses_token_ids else None
        self.cache.append_slots(seq.seq_id, num_new, token_ids)
        seq.num_cached += num_new
        return ScheduledSequence(seq, num_new)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        if self.preemption_mode == "swap":
            try:
                self.cache.swap_out([seq.seq_id])
            except KVCacheFull:  # the CPU pool is full: recompute instead
                pass
            else:
                seq.status = Status.SWAPPED
                self.swapped.append(seq)
                return
        self.cache.free(seq.seq_id)
        seq.status, seq.num_cached = Status.WAITING, 0
        self.waiting.appendleft(seq)
