"""THE scheduler: continuous batching over any KV cache, with preemption (paper §4.5, §5).

Every step (one forward pass of the model) the scheduler decides which sequences run and how
many of their tokens they feed, and makes room for those tokens in the cache. It touches no
tensors: it returns a plain plan, and it sees the cache only through the ``KVCache``
interface, so the same code schedules the paged and the contiguous cache, and the same code
serves a real transformer (``LLM``) and the known-lengths stand-in of the memory charts.

It schedules *groups* (``SequenceGroup``): one request's sequences, one for a plain request, up
to ``n`` for parallel sampling and ``beam_width`` for beam search (§4.4). A group is admitted,
preempted and resumed whole (§4.5: "all-or-nothing"), and it keeps ``width`` seats in the batch
from admission on, so that its forks always find one.

One step, in this order (as vLLM's scheduler, and Orca's iteration-level scheduling):

1. **Running groups** (oldest first). First the cache catches up with what the engine did last
   step: children it forked are forked in the cache (sharing every block: copy-on-write happens
   at the next append, not here), and sequences it dropped are freed. Then each sequence feeds
   its next token (decode), or its next chunk of prompt (chunked prefill), and needs room for
   those tokens (``can_append_many``, then ``append_slots``). When the cache has none, the
   *newest* running group is preempted (the latest-arrived first; ``choose_victim`` says so and
   a subclass may choose another) until there is room or the group preempted itself:
   * ``recompute``: its memory is freed and it goes back to the front of the waiting queue, each
     sequence to be prefilled again from every token it had (prompt + generated);
   * ``swap``: its K/V moves to the CPU pool (falling back to recompute when that is full) and
     it waits in the swapped queue.
2. **Swapped groups** come back (oldest first) when no one was preempted this step.
3. **Waiting groups** are admitted first come, first served while the cache can allocate
   them, the batch has seats (``max_num_seqs``) and the step has tokens left
   (``max_num_batched_tokens``); nothing overtakes the head of the queue. A prompt longer than
   what is left of the step's tokens is admitted with its first chunk (chunked prefill).

A sequence samples its next token in a step whose tokens reach the end of its ``token_ids``.
The beams of a beam search must all sample in the same step (each step ranks every beam's
continuations together), so after a recompute they are fed up to their last token first and
then take that last step together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from minipaged.engine.sequence import Sequence, SequenceGroup, Status
from minipaged.kv import KVCache, KVCacheFull

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(slots=True)
class ScheduledSequence:
    """A sequence in this step's batch, feeding its ``num_new_tokens`` tokens that end at
    ``seq.num_cached`` (room for them is already made in the cache). ``samples``: this step
    yields the sequence's next token (all its tokens are in the cache once it has run).

    Plain data, built once per sequence per step, and treated as read-only. (Not ``frozen``: a
    frozen dataclass costs three times as much to build, ~1 us, which a 256-sequence step pays
    256 times.)"""

    seq: Sequence
    group: SequenceGroup
    num_new_tokens: int
    samples: bool

    @classmethod
    def of(cls, group: SequenceGroup, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        """The entry of ``seq`` once its ``num_cached`` counts this step's tokens."""
        return cls(seq, group, num_new_tokens, seq.num_cached == len(seq.token_ids))


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan of one step: who runs with how many tokens, and what happened to memory."""

    scheduled: list[ScheduledSequence]  # running groups first (oldest first), then admitted ones
    num_preempted: int
    num_batched_tokens: int  # the new tokens of all of them

    @property
    def is_decode(self) -> bool:
        """One token per sequence: the shape the decode kernel and CUDA graphs serve."""
        return self.num_batched_tokens == len(self.scheduled)


class Scheduler:
    """Queues of waiting, running and swapped groups over one KV cache."""

    def __init__(
        self, cache: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int, preemption_mode: str = "recompute"
    ) -> None:
        assert preemption_mode in PREEMPTION_MODES, preemption_mode  # validated by the caller
        self.cache = cache
        self.uses_token_ids = cache.uses_token_ids  # fixed for a cache's life (prefix caching on or off)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # in order of admission
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = 0

    def add(self, group: SequenceGroup) -> None:
        assert group.status is Status.WAITING and all(seq.num_cached == 0 for seq in group.seqs)
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(group.seqs) for group in self.running)

    def finish(self, group: SequenceGroup) -> None:
        """A group is done (finished, or aborted wherever it is): the memory it holds on the
        device or in swap space goes back to the cache."""
        queue = {Status.WAITING: self.waiting, Status.RUNNING: self.running, Status.SWAPPED: self.swapped}[group.status]
        queue.remove(group)
        if group.status is not Status.WAITING:
            for seq_id in self._held(group):
                self.cache.free(seq_id)
        group.seqs, group.forks, group.dropped = [], [], []
        group.status = Status.FINISHED

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted_before = self.num_preemptions

        # 1. Running groups, oldest first; make room by preempting the newest.
        index = 0
        while index < len(self.running) and budget > 0:
            group = self.running[index]
            if (group.forks or group.dropped) and not self._catch_up(group):
                self._preempt_one(index)  # if that was this group, the next one takes its index
                continue
            if len(group.seqs) == 1:  # most groups: one sequence, which just tries to grow
                seq = group.seqs[0]
                n = len(seq.token_ids) - seq.num_cached
                if n > budget:
                    n = budget
                if n > 0:
                    try:  # KVCacheFull changes nothing: one look at its table instead of two
                        scheduled.append(self._append(group, seq, n))
                    except KVCacheFull:
                        self._preempt_one(index)
                        continue
                    budget -= n
            else:  # several sequences grow all or none: their growth is checked first
                appends = self._next_tokens(group, budget)
                if not self.cache.can_append_many({seq.seq_id: n for seq, n in appends}):
                    self._preempt_one(index)
                    continue
                for seq, n in appends:
                    scheduled.append(self._append(group, seq, n))
                    budget -= n
            index += 1
        seats = sum(group.width for group in self.running)

        # 2. Swapped groups come back while nothing needs preempting.
        while self.swapped and self.num_preemptions == preempted_before and budget > 0 \
                and seats + self.swapped[0].width <= self.max_num_seqs:
            group = self.swapped[0]
            seq_ids = [seq.seq_id for seq in group.seqs if self.cache.is_swapped(seq.seq_id)]
            try:
                self.cache.swap_in(seq_ids)
            except KVCacheFull:
                break
            appends = self._next_tokens(group, budget)
            if not self.cache.can_append_many({seq.seq_id: n for seq, n in appends}):
                self.cache.swap_out(seq_ids)  # no room to grow after all: leave it swapped
                break
            self.swapped.popleft()
            group.status = Status.RUNNING
            self.running.append(group)
            seats += group.width
            scheduled += [self._append(group, seq, n) for seq, n in appends]
            budget -= sum(n for _, n in appends)

        # 3. Waiting groups, first come first served, while they fit.
        while self.waiting and not self.swapped and budget >= len(self.waiting[0].seqs) \
                and seats + self.waiting[0].width <= self.max_num_seqs:
            group = self.waiting[0]
            chunks = self._first_chunks(group, budget)
            requests = [(n, seq.max_len, self._token_ids(seq, 0, n)) for seq, n in chunks]
            if len(requests) == 1:  # one sequence; a new request also needs room for the forks it will make
                seq = group.seqs[0]
                width = group.width if len(seq.token_ids) == seq.num_prompt_tokens else 1
                fits = self.cache.can_allocate(*requests[0], width=width)
            else:  # a group preempted by recompute: each sequence is prefilled again
                fits = self.cache.can_allocate_many(requests)
            if not fits:
                break
            self.waiting.popleft()
            group.status = Status.RUNNING
            self.running.append(group)
            seats += group.width
            for (seq, n), request in zip(chunks, requests):
                num_cached = self.cache.allocate(seq.seq_id, *request)
                seq.num_cached = n
                scheduled.append(ScheduledSequence.of(group, seq, n - num_cached))
                budget -= n - num_cached
        return SchedulerOutput(scheduled, self.num_preemptions - preempted_before, self.max_num_batched_tokens - budget)

    # -- what a group feeds ----------------------------------------------------------------
    def _next_tokens(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int]]:
        """``(sequence, tokens to feed)`` for a group in the cache, within ``budget`` tokens."""
        targets = self._targets(group)
        out = []
        for seq, target in zip(group.seqs, targets):
            n = min(target - seq.num_cached, budget)
            if n > 0:
                out.append((seq, n))
                budget -= n
        beams_sample_together = group.is_beam_search and targets[0] == len(group.seqs[0].token_ids)
        if beams_sample_together and len(out) < len(group.seqs):
            return []  # the beams' common step does not fit in what is left of this step's budget
        return out

    @staticmethod
    def _targets(group: SequenceGroup) -> list[int]:
        """How far each sequence is fed: to its end, except beams catching up after a recompute,
        which stop one token short until every beam is there (then they sample together)."""
        lengths = [len(seq.token_ids) for seq in group.seqs]
        if group.is_beam_search and len(group.seqs) > 1 and any(
                len(seq.token_ids) - seq.num_cached > 1 for seq in group.seqs):
            return [n - 1 for n in lengths]
        return lengths

    def _first_chunks(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int]]:
        """The tokens each sequence of a waiting group is admitted with: at least one each."""
        chunks = []
        for i, (seq, target) in enumerate(zip(group.seqs, self._targets(group))):
            n = min(target, budget - (len(group.seqs) - 1 - i))
            chunks.append((seq, n))
            budget -= n
        return chunks

    def _token_ids(self, seq: Sequence, start: int, num: int) -> list[int] | None:
        return seq.token_ids[start:start + num] if self.uses_token_ids else None

    def _append(self, group: SequenceGroup, seq: Sequence, num_new: int) -> ScheduledSequence:
        """Room in the cache for a running sequence's next ``num_new`` tokens."""
        self.cache.append_slots(seq.seq_id, num_new, self._token_ids(seq, seq.num_cached, num_new))
        seq.num_cached += num_new
        return ScheduledSequence.of(group, seq, num_new)

    # -- memory ----------------------------------------------------------------------------
    def _catch_up(self, group: SequenceGroup) -> bool:
        """Free what the group dropped, fork its new children in the cache, then free the dropped
        parents of those children (a finished sample can be one). Freeing first lets a contiguous
        fork reuse a dropped beam's slab. False if a fork found no memory (a contiguous slab;
        paged forks share and never fail); what was done so far stays done."""
        parents = {parent.seq_id for parent, _ in group.forks}
        for seq in [seq for seq in group.dropped if seq.seq_id not in parents]:
            self.cache.free(seq.seq_id)
            group.dropped.remove(seq)
        while group.forks:
            parent, child = group.forks[0]
            try:
                self.cache.fork(parent.seq_id, child.seq_id)
            except KVCacheFull:
                return False
            group.forks.pop(0)
        for seq in group.dropped:
            self.cache.free(seq.seq_id)
        group.dropped = []
        return True

    def _held(self, group: SequenceGroup) -> list[int]:
        """Sequences of the group whose K/V the cache holds (live or swapped out)."""
        pending = {child.seq_id for _, child in group.forks}
        return [seq.seq_id for seq in group.seqs + group.dropped if seq.seq_id not in pending]

    def choose_victim(self, candidates: list[SequenceGroup]) -> SequenceGroup:
        """The group to preempt when a running group finds no room, among ``candidates``: that
        group and the running groups after it (not yet scheduled this step), oldest first.

        vLLM's rule, the newest. A subclass may choose otherwise (notebook 7's exercise).
        """
        return candidates[-1]

    def _preempt_one(self, index: int) -> None:
        """Preempt one of the running groups from ``index`` on, as ``choose_victim`` picks."""
        candidates = self.running[index:]
        victim = self.choose_victim(list(candidates))
        at = next((index + i for i, group in enumerate(candidates) if group is victim), None)
        assert at is not None, "choose_victim must return one of the candidates"
        self._preempt(self.running.pop(at))

    def _preempt(self, group: SequenceGroup) -> None:
        self.num_preemptions += 1
        if self.preemption_mode == "swap" and self._catch_up(group):
            seq_ids = [seq.seq_id for seq in group.seqs]
            try:
                self.cache.swap_out(seq_ids)
            except KVCacheFull:  # the CPU pool is full: recompute instead
                pass
            else:
                group.status = Status.SWAPPED
                self.swapped.append(group)
                return
        for seq_id in self._held(group):
            self.cache.free(seq_id)
        group.forks, group.dropped = [], []
        for seq in group.seqs:
            seq.num_cached = 0
        group.status = Status.WAITING
        self.waiting.appendleft(group)
