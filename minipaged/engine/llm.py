"""The facade users call: ``LLM.generate`` and ``LLM.beam_search`` (vLLM's API), over the
engine loop (paper §4.4, §4.5, §5).

``LLMEngine`` is the loop: requests are added, and each ``step`` asks the scheduler for a plan,
has the runner execute it (the transformer, or the charts' stand-in), samples from the logits,
applies the tokens to their requests (forking samples and beams, dropping losing beams) and
retires finished requests. ``LLM`` builds a model, a cache, a scheduler and a runner from a few
arguments, turns prompts into requests, runs the loop to the end with a progress bar, and
returns vLLM-shaped outputs with the run's statistics.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from minipaged.engine.beam_search import beam_step, is_done, penalized
from minipaged.engine.model_runner import ModelRunner
from minipaged.engine.sampler import sample, sampling_batch
from minipaged.engine.scheduler import PREEMPTION_MODES, ScheduledSequence, Scheduler, SchedulerOutput
from minipaged.engine.sequence import (
    PENDING,
    BeamSearchParams,
    PendingTokens,
    SamplingParams,
    Sequence,
    SequenceGroup,
    Status,
)
from minipaged.kv import ContiguousKVCache, KVCache, MemoryBreakdown, PagedKVCache
from minipaged.kv.block_allocator import blocks_needed
from minipaged.kv.contiguous import RESERVATIONS

KV_CACHES = ("paged", "contiguous")


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # generated tokens only
    cumulative_logprob: float
    finish_reason: str  # "stop" (end of sequence, a stop token or string) or "length"


@dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class StepRecord:
    """What one step did; ``breakdown`` only when the engine measures memory."""

    num_running: int
    num_waiting: int
    num_batched_tokens: int
    num_preempted: int
    num_cached_tokens: int  # tokens whose K/V the cache holds during the step's forward pass (per sequence)
    num_table_blocks: int  # blocks in the block tables, a shared block once per table holding it
    num_used_blocks: int  # distinct blocks in use: fewer than num_table_blocks when blocks are shared
    breakdown: MemoryBreakdown | None
    # Host wall time per phase: schedule, prepare and forward (queueing the model), sample
    # (queueing the sampler), wait (for sampled tokens to reach the host: the GPU's time that the
    # host could not hide) and apply (tokens into requests).
    seconds: dict[str, float]


@dataclass
class RunStats:
    """A run's statistics (``LLM.stats`` after ``generate``)."""

    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    elapsed: float = 0.0  # wall-clock seconds
    steps: list[StepRecord] = field(default_factory=list)
    kv_capacity: int = 1

    @property
    def output_tokens_per_second(self) -> float:
        return self.num_output_tokens / self.elapsed if self.elapsed else math.nan

    @property
    def requests_per_second(self) -> float:
        return self.num_requests / self.elapsed if self.elapsed else math.nan

    @property
    def mean_running(self) -> float:
        return sum(s.num_running for s in self.steps) / max(len(self.steps), 1)

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preempted for s in self.steps)

    @property
    def kv_utilization(self) -> list[float]:
        """Per step, the share of the KV space holding token states."""
        return [s.num_cached_tokens / self.kv_capacity for s in self.steps]

    def time_breakdown(self) -> dict[str, float]:
        """Total seconds per phase over the run."""
        total: dict[str, float] = {}
        for step in self.steps:
            for phase, seconds in step.seconds.items():
                total[phase] = total.get(phase, 0.0) + seconds
        return total

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.time_breakdown().items())
        return (f"{self.num_requests} requests, {self.num_output_tokens} output tokens in {self.elapsed:.2f} s: "
                f"{self.output_tokens_per_second:,.0f} tok/s, {self.requests_per_second:.1f} req/s, "
                f"mean batch {self.mean_running:.1f}, {self.num_preemptions} preemptions, {len(self.steps)} steps "
                f"({phases})")


@dataclass
class Draws:
    """One step's samples: the sequences that sampled (in logits-row order), which of them each
    token is for, the tokens on the device, and those tokens on their way to the host."""

    sampling: list[ScheduledSequence]
    rows: list[tuple[int, ScheduledSequence, int]]  # per token: (logits row, item, sample index)
    groups_of_one: bool = True  # every sequence that sampled is its request's only one (no n > 1, no beams)
    forks: bool = False  # a request's first token with n > 1: some rows are new samples to fork
    tokens: Tensor | None = None  # int64 [len(rows)], on the logits' device
    beams: list[tuple[SequenceGroup, Tensor]] = field(default_factory=list)  # (group, its beams' log-probs)
    _host: tuple[Tensor, Tensor] | None = None
    _ready: torch.cuda.Event | None = None

    def send(self, tokens: Tensor, logprobs: Tensor) -> None:
        """Start copying the tokens and their log-probabilities to the host, without waiting."""
        self.tokens = tokens
        self._host = tokens.to("cpu", non_blocking=True), logprobs.to("cpu", non_blocking=True)  # pinned on a GPU
        if tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def receive(self) -> tuple[list[int], list[float]]:
        """The tokens and log-probabilities, once they have arrived (the host waits here)."""
        if self._host is None:
            return [], []
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[0].tolist(), self._host[1].tolist()


class LLMEngine:
    """The loop: a scheduler over a cache, a runner, and the requests in flight.

    After each forward pass the engine turns logits into tokens and applies them to the groups:
    a plain sample appends its token; a request's first sample with ``n > 1`` forks ``n - 1``
    children from the prompt (they share its blocks); a beam-search step forks the beams chosen
    twice and drops the beams chosen by no one (``minipaged.engine.beam_search``). It only *says*
    so on the group (``forks``, ``dropped``); the scheduler changes the cache at the next step.
    """

    def __init__(
        self,
        cache: KVCache,
        runner,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str = "recompute",
        max_model_len: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        tokenizer=None,
        measure_memory: bool = False,
        async_scheduling: bool = False,
    ) -> None:
        self.cache, self.runner, self.tokenizer = cache, runner, tokenizer
        self.scheduler = Scheduler(cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   preemption_mode=preemption_mode)
        self.max_model_len = max_model_len or cache.max_seq_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.measure_memory = measure_memory
        self.async_scheduling = async_scheduling  # see ``step``
        self.in_flight: Draws | None = None  # a step's tokens not yet applied (async scheduling)
        self.observers: list[Callable[[LLMEngine], None]] = []  # called after every step (e.g. minipaged.viz.Recorder)
        self.last_plan: SchedulerOutput | None = None
        self._next_id = 0

    def make_request(self, prompt_token_ids: list[int], params: SamplingParams | BeamSearchParams,
                     arrival_time: float = 0.0, request_id: int | None = None) -> SequenceGroup:
        """A request checked against the model and the cache; nothing is allocated or queued."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("a prompt needs at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"a prompt of {n} tokens leaves no room to generate: the model allows "
                             f"max_model_len={self.max_model_len} tokens (prompt + output)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer, and this model has none: use stop_token_ids")
        width = params.n
        if width > self.scheduler.max_num_seqs:
            raise ValueError(f"a group of {width} sequences (n or beam_width) cannot run in a batch of "
                             f"max_num_seqs={self.scheduler.max_num_seqs}")
        max_len = min(n + params.max_tokens, self.max_model_len)
        # The longest it can get must fit the cache on its own (ValueError if never; it holds at
        # most max_len - 1 tokens: its last token is never fed back), and so must the whole group,
        # even if its sequences ended up sharing nothing.
        self.cache.can_allocate(max_len - 1, max_len)
        if width > 1 and not self.cache.can_ever_hold(width, max_len - 1, max_len):
            raise ValueError(f"{width} sequences of up to {max_len} tokens (n or beam_width) can never fit in this "
                             f"KV cache of {self.cache.capacity} token slots: lower n/beam_width or max_tokens")
        seed = getattr(params, "seed", None)
        seed = seed if seed is not None else random.getrandbits(31)
        request_id = self._new_id() if request_id is None else request_id
        seq = Sequence(request_id, list(prompt_token_ids), params, seed, max_len, n)
        return SequenceGroup(request_id, [seq], params, arrival_time)

    def _new_id(self) -> int:
        """A fresh id for a request or a sequence (a request's first sequence takes its id)."""
        self._next_id += 1
        return self._next_id - 1

    def add(self, group: SequenceGroup) -> None:
        self._next_id = max(self._next_id, group.request_id + 1)
        self.scheduler.add(group)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> tuple[list[SequenceGroup], StepRecord]:
        """One iteration: schedule, execute, sample, apply the tokens; returns the finished requests.

        With ``async_scheduling`` the host does not wait for a step's tokens before it schedules
        the next one (vLLM's asynchronous scheduling). It assumes every sequence goes on: each
        sequence that sampled gets a ``PENDING`` last token (unless that token is its last by
        length), the next step is scheduled and queued on the GPU, which takes the pending
        tokens from the device, and only then does the host wait for the previous tokens and
        apply them. So the host's work for step k+1 runs while the GPU computes step k. A
        sequence that turns out to have stopped (end of sequence, a stop token or string) has
        run one step too many: that token is dropped, its blocks freed, and no output changes.
        Steps that fork or rank beams, and a cache that hashes token ids (prefix caching), need
        the tokens on the host first: those are applied before the next step is scheduled.
        """
        t0 = time.perf_counter()
        previous, self.in_flight = self.in_flight, None
        pending = None if previous is None else self._mark_pending(previous)
        plan = self.last_plan = self.scheduler.schedule()
        record = self._record(plan)
        t1 = time.perf_counter()
        logits = self.runner.execute(plan, pending)
        t2 = time.perf_counter()
        seconds = {"schedule": t1 - t0, **(self.runner.last_seconds or {"execute": t2 - t1})}
        draws = None
        if logits is not None:
            draws = self._draw(logits, [item for item in plan.scheduled if item.samples])
        seconds["sample"] = time.perf_counter() - t2
        seconds |= {"wait": 0.0, "apply": 0.0}
        finished = [] if previous is None else self._apply(previous, seconds)
        if draws is not None:
            if self._may_overlap(draws):
                self.in_flight = draws  # applied at the next step, once it is queued
            else:
                finished += self._apply(draws, seconds)
        if not self.scheduler.has_unfinished():
            self.in_flight = None  # every request is done: the tokens on their way are unwanted
        record.seconds = seconds
        for observer in self.observers:
            observer(self)
        return finished, record

    # -- after the forward pass: tokens into groups ----------------------------------------
    def _draw(self, logits: Tensor, sampling: list[ScheduledSequence]) -> Draws:
        """Queue the sampling of every sequence that samples (``logits`` row ``i`` is
        ``sampling[i]``'s): a request's first token draws ``n`` samples, a beam search ranks its
        beams' continuations. The tokens start on their way to the host; ``_apply`` takes them."""
        rows: list[tuple[int, ScheduledSequence, int]] = []  # (logits row, item, sample index)
        beams: dict[int, tuple[SequenceGroup, list[int]]] = {}  # a beam search's rows, all its beams
        several, forks = False, False  # a group of several sequences sampled; one of them forks
        for row, item in enumerate(sampling):
            group = item.group
            several = several or group.width > 1
            if group.is_beam_search:
                beams.setdefault(group.request_id, (group, []))[1].append(row)
            elif group.width > 1 and len(item.seq.token_ids) == item.seq.num_prompt_tokens:  # first token: n draws
                rows += [(row, item, index) for index in range(group.width)]
                forks = True
            else:  # one draw for the sequence itself
                rows.append((row, item, item.seq.index))
        draws = Draws(sampling, rows, not several and not beams, forks)
        if rows:
            batch = sampling_batch([(item.seq, index) for _, item, index in rows], logits.shape[-1], logits.device)
            one_each = not forks and not beams  # then row i is token i: no index to copy to the device
            tokens, logprobs = sample(logits[: len(rows)] if one_each else logits[[row for row, _, _ in rows]], batch)
            draws.send(tokens, logprobs)
        draws.beams = [(group, torch.log_softmax(logits[beam_rows].float(), dim=-1))
                       for group, beam_rows in beams.values()]
        return draws

    def _may_overlap(self, draws: Draws) -> bool:
        """Can the next step be scheduled before these tokens reach the host? Only when every
        sequence just appends its token: no forks (``n > 1``), no beams, no prefix hashing."""
        return self.async_scheduling and not self.cache.uses_token_ids and draws.groups_of_one

    def _mark_pending(self, draws: Draws) -> PendingTokens:
        """Before the tokens of ``draws`` are known: each sequence that goes on gets a ``PENDING``
        last token, which the next step feeds from the device."""
        rows = {}
        for row, (_, item, _) in enumerate(draws.rows):
            seq = item.seq
            # A token that ends the sequence by length is never fed back, and a sequence that
            # stopped already (at the step before) has nothing to feed.
            if seq.finish_reason is None and len(seq.token_ids) + 1 < seq.max_len:
                seq.token_ids.append(PENDING)
                rows[seq.seq_id] = row
        return PendingTokens(draws.tokens, rows)

    def _apply(self, draws: Draws, seconds: dict[str, float]) -> list[SequenceGroup]:
        """Wait for the tokens of ``draws`` and apply them to their groups; the finished groups."""
        start = time.perf_counter()
        tokens, logprobs = draws.receive()
        waited = time.perf_counter()
        if draws.forks:  # children first: they take the prompt as it is, before its first sample joins it
            seqs = [self._fork(item.group, item.seq, index) if index != item.seq.index else item.seq
                    for _, item, index in draws.rows]
            for (_, item, _), seq in zip(draws.rows, seqs):
                if seq is not item.seq:
                    item.group.seqs.append(seq)
        else:
            seqs = [item.seq for _, item, _ in draws.rows]
        ended: dict[int, SequenceGroup] = {}  # groups that may have finished: one of theirs stopped
        for (_, item, _), seq, token, logprob in zip(draws.rows, seqs, tokens, logprobs, strict=True):
            # A sequence that stopped a step earlier does not want this token.
            if seq.finish_reason is None and self._extend(item.group, seq, token, logprob):
                ended[item.group.request_id] = item.group
        for group, beam_logprobs in draws.beams:
            self._beam_step(group, beam_logprobs)
            ended[group.request_id] = group
        finished = []
        for group in ended.values():
            if not group.seqs and group.status is not Status.FINISHED:
                self.scheduler.finish(group)
                finished.append(group)
        seconds["wait"] += waited - start
        seconds["apply"] += time.perf_counter() - waited
        return finished

    def _fork(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        """A new sequence holding ``parent``'s tokens. The cache forks it at the start of the next
        step, sharing every block: copy-on-write happens when it first appends into a shared,
        partly filled block, not here."""
        child = parent.fork(self._new_id(), index)
        group.forks.append((parent, child))
        return child

    def _extend(self, group: SequenceGroup, seq: Sequence, token: int, logprob: float) -> bool:
        """Append a sampled token (in place of its ``PENDING``); a sequence that stops leaves the
        group's live sequences (then True)."""
        if seq.token_ids[-1] == PENDING:
            seq.token_ids[-1] = token
        else:
            seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if not self._check_stop(seq, token):
            return False
        group.seqs.remove(seq)
        group.finished.append(seq)
        if any(child is seq for _, child in group.forks):  # never reached the cache: nothing to free
            group.forks = [(parent, child) for parent, child in group.forks if child is not seq]
        else:
            group.dropped.append(seq)
        return True

    def _beam_step(self, group: SequenceGroup, logprobs: Tensor) -> None:
        """One beam-search step for ``group``, whose live beams produced ``logprobs`` ``[B, V]``."""
        params, beams = group.params, group.seqs
        num_generated = len(beams[0].token_ids) - beams[0].num_prompt_tokens
        eos = () if params.ignore_eos else self.eos_token_ids
        step = beam_step(logprobs, [beam.cumulative_logprob for beam in beams], beam_width=params.beam_width,
                         num_generated=num_generated, max_new_tokens=beams[0].max_len - beams[0].num_prompt_tokens,
                         eos_token_ids=eos, length_penalty=params.length_penalty)
        # Finished hypotheses: the best beam_width of the old and the new ones.
        for candidate, _ in step.ended:
            hypothesis = beams[candidate.parent].fork(-1)
            hypothesis.token_ids.append(candidate.token)
            hypothesis.cumulative_logprob = candidate.cumulative_logprob
            hypothesis.finish_reason = "stop" if candidate.token in eos else "length"
            group.finished.append(hypothesis)
        group.finished.sort(key=lambda h: -_beam_score(h))
        del group.finished[params.beam_width:]
        # The next beams: a beam chosen once continues itself, one chosen again is forked (before
        # any of them takes its token), one chosen by no one is dropped.
        group.seqs, chosen = [], set()
        for rank, candidate in enumerate(step.beams):
            parent = beams[candidate.parent]
            group.seqs.append(parent if candidate.parent not in chosen else self._fork(group, parent, rank))
            chosen.add(candidate.parent)
        group.dropped += [beam for i, beam in enumerate(beams) if i not in chosen]
        for beam, candidate in zip(group.seqs, step.beams):
            beam.token_ids.append(candidate.token)
            beam.cumulative_logprob = candidate.cumulative_logprob
        best = step.beams[0].cumulative_logprob if step.beams else None
        if is_done(best, [_beam_score(h) for h in group.finished], beam_width=params.beam_width,
                   num_generated=num_generated + 1, length_penalty=params.length_penalty):
            group.dropped += group.seqs
            group.seqs = []

    def _record(self, plan: SchedulerOutput) -> StepRecord:
        scheduler = self.scheduler
        breakdown = None
        if self.measure_memory:
            head = scheduler.waiting[0].seqs[0] if scheduler.waiting else None
            breakdown = self.cache.memory_breakdown(None if head is None else (len(head.token_ids), head.max_len))
        table_blocks, used_blocks = self.cache.blocks_in_use()
        return StepRecord(
            num_running=scheduler.num_running_seqs,
            num_waiting=sum(len(g.seqs) for g in scheduler.waiting) + sum(len(g.seqs) for g in scheduler.swapped),
            num_batched_tokens=plan.num_batched_tokens,
            num_preempted=plan.num_preempted,
            num_cached_tokens=sum(seq.num_cached for group in scheduler.running for seq in group.seqs),
            num_table_blocks=table_blocks,
            num_used_blocks=used_blocks,
            breakdown=breakdown,
            seconds={},
        )

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.finish_reason = "stop"
        elif params.stop and self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= seq.max_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Has the text ended in a stop string? The text is cut before it, as vLLM does."""
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = text.find(stop)
            if at >= 0:
                seq.text = text[:at]
                return True
        return False



def _beam_score(hypothesis: Sequence) -> float:
    """A finished hypothesis' length-penalized score (what beam search ranks them by)."""
    return penalized(hypothesis.cumulative_logprob, len(hypothesis.output_token_ids), hypothesis.params.length_penalty)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class LLM:
    """A model served from a paged or contiguous KV cache (DESIGN.md's engine API, after vLLM).

    ``model``: a built-in name (``"smollm2-135m"``), a local directory, or a loaded transformers
    Llama model. ``num_blocks`` fixes the KV space (the contiguous arena gets the same number of
    token slots); by default it takes ``gpu_memory_fraction`` of the GPU's free memory (at most
    what ``max_num_seqs`` sequences of ``max_model_len`` tokens need), or on a CPU enough for one
    sequence of ``max_model_len`` tokens (at least 256 blocks). ``num_cpu_blocks`` is the swap
    space for ``preemption_mode="swap"``. The paged cache admits a prompt only while
    ``watermark`` of its blocks stay free for running sequences to grow into (vLLM's 1%).
    ``enforce_eager`` turns CUDA graphs off. ``async_scheduling`` (default: on a GPU) schedules
    each step while the GPU still runs the one before (``LLMEngine.step``); outputs are the same.
    """

    def __init__(
        self,
        model,
        kv_cache: str = "paged",
        *,
        reservation: str = "max",
        block_size: int = 16,
        num_blocks: int | None = None,
        preemption_mode: str = "recompute",
        num_cpu_blocks: int = 0,
        enable_prefix_caching: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        gpu_memory_fraction: float = 0.5,
        watermark: float = 0.01,
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
    ) -> None:
        from minipaged.model import load_model  # here: the charts import the engine without transformers

        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        if reservation not in RESERVATIONS:
            raise ValueError(f"reservation must be one of {RESERVATIONS}, got {reservation!r}")
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        if preemption_mode == "swap" and kv_cache == "paged" and num_cpu_blocks < 1:
            raise ValueError("preemption_mode='swap' needs CPU swap space: pass num_cpu_blocks >= 1")
        _positive_int("max_num_seqs", max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        if not 0 < gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction!r}")
        self.model, self.tokenizer = load_model(model, device=device, dtype=dtype)
        config = self.model.config
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        max_model_len = max_model_len or config.max_position_embeddings
        _positive_int("max_model_len", max_model_len)
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
        if num_blocks is None:
            num_blocks = self._default_num_blocks(block_size, max_num_seqs, max_model_len, gpu_memory_fraction,
                                                  device, dtype)
        shape = dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                     dtype=dtype, device=device, max_seq_len=max_model_len)
        cache: KVCache
        if kv_cache == "paged":
            cache = PagedKVCache(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                                 num_cpu_blocks=num_cpu_blocks, watermark=watermark, **shape)
        else:
            cache = ContiguousKVCache(num_blocks * block_size, reservation, **shape)
        runner = ModelRunner(self.model, cache, max_num_seqs=max_num_seqs,
                             use_cuda_graphs=device.type == "cuda" and not enforce_eager,
                             max_num_batched_tokens=max_num_batched_tokens)
        self.engine = LLMEngine(cache, runner, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                preemption_mode=preemption_mode, max_model_len=max_model_len,
                                eos_token_ids=tuple(config.eos_token_ids), tokenizer=self.tokenizer,
                                async_scheduling=device.type == "cuda" if async_scheduling is None
                                else async_scheduling)
        self.cache = cache
        self.stats = RunStats(kv_capacity=cache.capacity)

    def _default_num_blocks(self, block_size: int, max_num_seqs: int, max_model_len: int,
                            fraction: float, device: torch.device, dtype: torch.dtype) -> int:
        config = self.model.config
        per_sequence = blocks_needed(max_model_len, block_size)
        needed = max_num_seqs * per_sequence  # more blocks than this are never used
        if device.type != "cuda":
            return min(max(256, per_sequence), needed)
        block_bytes = 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, min(int(free * fraction) // block_bytes, needed))

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt (a string, or a list of token ids); outputs in the prompts' order,
        each with ``n`` completions in the order of their samples."""
        prompts = self._prompt_list(prompts)
        param_list = self._param_list(sampling_params or SamplingParams(), len(prompts), SamplingParams)
        # Every request is checked before any is queued, so a bad one leaves the engine untouched.
        groups = [self.engine.make_request(self._encode(p), sp) for p, sp in zip(prompts, param_list)]
        return self._run(prompts, groups, use_tqdm)

    def beam_search(
        self,
        prompts: str | list[int] | list[str | list[int]],
        params: BeamSearchParams | list[BeamSearchParams],
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """The ``beam_width`` most likely completions of every prompt, best first (see
        ``minipaged.engine.beam_search`` for the rule, transformers' own). The beams of a prompt
        share their common history's blocks in the paged cache; in the contiguous cache each
        beam holds a slab of its own, copied when it forks. All prompts are searched at once."""
        prompts = self._prompt_list(prompts)
        param_list = self._param_list(params, len(prompts), BeamSearchParams)
        groups = [self.engine.make_request(self._encode(p), bp) for p, bp in zip(prompts, param_list)]
        return self._run(prompts, groups, use_tqdm)

    @staticmethod
    def _prompt_list(prompts) -> list:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return prompts

    @staticmethod
    def _param_list(params, num_prompts: int, kind: type) -> list:
        """One parameter object per prompt (one given for all, or one each), each of ``kind``."""
        param_list = params if isinstance(params, list) else [params] * num_prompts
        if len(param_list) != num_prompts:
            raise ValueError(f"got {len(param_list)} {kind.__name__} for {num_prompts} prompts: pass one, or one each")
        for p in param_list:
            if not isinstance(p, kind):
                raise ValueError(f"expected {kind.__name__}, got {type(p).__name__}")
        return param_list

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Answer conversations (``[{"role": "user", "content": "..."}, ...]``, or a list of them)
        through the tokenizer's chat template, with the assistant's turn opened."""
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template: use generate() with plain prompts")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids (integers)")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"token ids must be in [0, {vocab})")
        return list(prompt)

    def _run(self, prompts: list, groups: list[SequenceGroup], use_tqdm: bool) -> list[RequestOutput]:
        stats = self.stats = RunStats(num_requests=len(groups), kv_capacity=self.cache.capacity,
                                      num_prompt_tokens=sum(len(g.seqs[0].token_ids) for g in groups))
        for group in groups:
            self.engine.add(group)
        start = time.perf_counter()
        with tqdm(total=len(groups), desc="requests", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                finished, record = self.engine.step()
                stats.steps.append(record)
                bar.update(len(finished))
        stats.elapsed = time.perf_counter() - start
        stats.num_output_tokens = sum(len(seq.output_token_ids) for g in groups for seq in g.finished)
        return [self._output(prompt, group) for prompt, group in zip(prompts, groups)]

    def _output(self, prompt: str | list[int], group: SequenceGroup) -> RequestOutput:
        completions = []
        # Samples in the order they were drawn; beam hypotheses as ranked (best first).
        ranked = group.finished if group.is_beam_search else sorted(group.finished, key=lambda seq: seq.index)
        for index, seq in enumerate(ranked):
            text = seq.text
            if not text and self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            completions.append(CompletionOutput(index, text, seq.output_token_ids, seq.cumulative_logprob,
                                                seq.finish_reason))
        first = ranked[0]
        return RequestOutput(group.request_id, prompt if isinstance(prompt, str) else None,
                             first.token_ids[: first.num_prompt_tokens], completions)
