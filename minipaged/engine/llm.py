"""The facade users call: ``LLM.generate`` (vLLM's API), over the engine loop (paper §4.5, §5).

``LLMEngine`` is the loop: requests are added, and each ``step`` asks the scheduler for a plan,
has the runner execute it (the transformer, or the charts' stand-in), appends each sampled
token to its sequence and retires finished sequences. ``LLM`` builds a model, a cache, a
scheduler and a runner from a few arguments, turns prompts into requests, runs the loop to the
end with a progress bar, and returns vLLM-shaped outputs with the run's statistics.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from minipaged.engine.model_runner import ModelRunner
from minipaged.engine.scheduler import PREEMPTION_MODES, Scheduler, SchedulerOutput
from minipaged.engine.sequence import SamplingParams, Sequence
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
    num_cached_tokens: int  # tokens whose K/V the cache holds during the step's forward pass
    breakdown: MemoryBreakdown | None
    seconds: dict[str, float]  # wall time per phase: schedule, prepare, forward, sample, postprocess


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


class LLMEngine:
    """The loop: a scheduler over a cache, a runner, and the sequences in flight."""

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
    ) -> None:
        self.cache, self.runner, self.tokenizer = cache, runner, tokenizer
        self.scheduler = Scheduler(cache, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   preemption_mode=preemption_mode)
        self.max_model_len = max_model_len or cache.max_seq_len
        self.eos_token_ids = set(eos_token_ids)
        self.measure_memory = measure_memory
        self._next_id = 0

    def make_sequence(self, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float = 0.0,
                      seq_id: int | None = None) -> Sequence:
        """A request checked against the model and the cache; nothing is allocated or queued."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("a prompt needs at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"a prompt of {n} tokens leaves no room to generate: the model allows "
                             f"max_model_len={self.max_model_len} tokens (prompt + output)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer, and this model has none: use stop_token_ids")
        max_len = min(n + params.max_tokens, self.max_model_len)
        # The longest it can get must fit the cache on its own (ValueError if never; it holds at
        # most max_len - 1 tokens: its last token is never fed back).
        self.cache.can_allocate(max_len - 1, max_len)
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        if seq_id is None:
            seq_id, self._next_id = self._next_id, self._next_id + 1
        return Sequence(seq_id, list(prompt_token_ids), params, seed, max_len, arrival_time)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> tuple[list[Sequence], StepRecord]:
        """One iteration: schedule, execute, append the sampled tokens; returns the finished sequences."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        t1 = time.perf_counter()
        record = self._record(plan)
        t2 = time.perf_counter()
        tokens, logprobs = self.runner.execute(plan)
        t3 = time.perf_counter()
        finished = []
        sampling = (item.seq for item in plan.scheduled if item.samples)
        for seq, token, logprob in zip(sampling, tokens, logprobs, strict=True):
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if self._check_stop(seq, token):
                self.scheduler.finish(seq)
                finished.append(seq)
        t4 = time.perf_counter()
        record.seconds = {"schedule": t1 - t0, **(self.runner.last_seconds or {"execute": t3 - t2}),
                          "postprocess": t4 - t3}
        return finished, record

    def _record(self, plan: SchedulerOutput) -> StepRecord:
        scheduler = self.scheduler
        breakdown = None
        if self.measure_memory:
            head = scheduler.waiting[0] if scheduler.waiting else None
            breakdown = self.cache.memory_breakdown(None if head is None else (len(head.token_ids), head.max_len))
        return StepRecord(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting) + len(scheduler.swapped),
            num_batched_tokens=plan.num_batched_tokens,
            num_preempted=plan.num_preempted,
            num_cached_tokens=sum(s.num_cached for s in scheduler.running),
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
    ``enforce_eager`` turns CUDA graphs off.
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
                             use_cuda_graphs=device.type == "cuda" and not enforce_eager)
        self.engine = LLMEngine(cache, runner, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                preemption_mode=preemption_mode, max_model_len=max_model_len,
                                eos_token_ids=tuple(config.eos_token_ids), tokenizer=self.tokenizer)
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
        """Complete every prompt (a string, or a list of token ids); outputs in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(param_list)} SamplingParams for {len(prompts)} prompts: pass one, or one each")
        # Every request is checked before any is queued, so a bad one leaves the engine untouched.
        seqs = [self.engine.make_sequence(self._encode(p), sp) for p, sp in zip(prompts, param_list)]
        return self._run(prompts, seqs, use_tqdm)

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

    def _run(self, prompts: list, seqs: list[Sequence], use_tqdm: bool) -> list[RequestOutput]:
        stats = self.stats = RunStats(num_requests=len(seqs), kv_capacity=self.cache.capacity,
                                      num_prompt_tokens=sum(len(s.token_ids) for s in seqs))
        for seq in seqs:
            self.engine.add(seq)
        start = time.perf_counter()
        with tqdm(total=len(seqs), desc="requests", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                finished, record = self.engine.step()
                stats.steps.append(record)
                bar.update(len(finished))
        stats.elapsed = time.perf_counter() - start
        stats.num_output_tokens = sum(len(s.output_token_ids) for s in seqs)
        return [self._output(prompt, seq) for prompt, seq in zip(prompts, seqs)]

    def _output(self, prompt: str | list[int], seq: Sequence) -> RequestOutput:
        text = seq.text
        if not text and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        completion = CompletionOutput(0, text, seq.output_token_ids, seq.cumulative_logprob, seq.finish_reason)
        return RequestOutput(seq.seq_id, prompt if isinstance(prompt, str) else None,
                             seq.token_ids[: seq.num_prompt_tokens], [completion])
