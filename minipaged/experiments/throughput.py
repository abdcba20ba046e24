"""Serving throughput on a GPU: paging lets the same memory batch more requests (paper §6.2, Fig. 12-13).

The same requests run through minipaged's engine on the paged cache and on the contiguous cache
with the Orca baselines' reservations (Max, Pow2, Oracle, §6.1), and through transformers' own
continuous batching (``generate_batch``) and static batching (``generate``). Every output length
is fixed (EOS ignored), so every system does the same work. Two KV budgets:

* ``large``: as much KV space as the GPU gives (half its free memory), so the batch is limited
  by ``max_num_seqs`` and the comparison is about the engine's speed;
* ``memory-bound``: ``--kv-slots`` token slots (16K by default), so memory limits how many
  requests run at once: the paper's setting, where paging wins by batching more (Fig. 13).

For each run (minipaged's: the median of 1, 3 or 5 passes, until two seconds are measured):
output tokens/s, requests/s, mean running batch, mean KV utilisation (share of the
KV space holding token states), preemptions, where the host time goes (schedule, prepare,
forward, sample, wait, apply: ``LLMEngine.step``), and the run's *roofline*: per step, the
larger of (weights + the K/V the step reads) over the GPU's copy bandwidth and the step's matmul
FLOPs over its measured bf16 matmul rate, summed over the steps; ``roofline_fraction`` =
roofline time / measured time.

    python -m minipaged.experiments.throughput --out DIR [--quick]

Writes DIR/throughput.csv and DIR/throughput.png.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minipaged.engine import LLM, SamplingParams
from minipaged.experiments.cli import gpu_parser, integer
from minipaged.experiments.kernel_bench import copy_bandwidth, cuda_graph_timer
from minipaged.experiments.roofline import kv_bytes_per_token, kv_shape, matmul_tflops
from minipaged.workloads import sample_lengths

# Llama-3.2-1B's shape: 16 layers, 2048 hidden, 32 query / 8 KV heads of dimension 64.
LLAMA_1B_SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=True)
SYSTEMS = ("paged", "contiguous-max", "contiguous-pow2", "contiguous-oracle")
MIN_SECONDS, MAX_PASSES = 2.0, 5  # how long minipaged's cells are measured (see run_minipaged)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_lens: list[int]
    output_lens: list[int]

    def head(self, n: int) -> Workload:
        """The first ``n`` requests (the slow runs take a subset, named in the CSV)."""
        if n >= len(self.prompt_lens):
            return self
        return Workload(f"{self.name} (first {n})", self.prompt_lens[:n], self.output_lens[:n])


def workloads(quick: bool, seed: int = 0) -> list[Workload]:
    """256 x (128 prompt + 128 output), and 512 ShareGPT-like requests (prompt <= 1024, total <= 2048)."""
    n_uniform, n_sharegpt = (16, 24) if quick else (256, 512)
    prompts, outputs = sample_lengths("sharegpt", n_sharegpt, np.random.default_rng(seed), 2048)
    prompts = np.minimum(prompts, 1024)
    return [
        Workload(f"{n_uniform}x(128+128)", [128] * n_uniform, [128] * n_uniform),
        Workload(f"{n_sharegpt} ShareGPT-like", prompts.tolist(), outputs.tolist()),
    ]


def random_prompts(work: Workload, vocab_size: int, low: int = 0) -> list[list[int]]:
    """The workload's prompts as random token ids in ``[low, vocab_size)``, the same for every system
    (seeded); static batching left-pads with id 0, so its prompts start at 1."""
    rng = np.random.default_rng(1)
    return [rng.integers(low, vocab_size, p).tolist() for p in work.prompt_lens]


def make_model(name: str, device: torch.device):
    """SmolLM2-135M with its real weights, or a random-weight model of Llama-3.2-1B's shape (bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minipaged.model import random_model
    from minipaged.model.loader import cached_builtin

    if name == "smollm2-135m":
        directory = cached_builtin("smollm2-135m")  # dequantized once, then read from the local cache
        return LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    return random_model(LlamaConfig(**LLAMA_1B_SHAPE), device=device, dtype=torch.bfloat16)[1]


def run_minipaged(hf_model, system: str, work: Workload, kv_slots: int | None, max_num_seqs: int) -> dict:
    kv_cache, _, reservation = system.partition("-")
    block_size = 16
    llm = LLM(hf_model, kv_cache, reservation=reservation or "max", block_size=block_size,
              num_blocks=None if kv_slots is None else kv_slots // block_size, max_num_seqs=max_num_seqs,
              max_model_len=2048, max_num_batched_tokens=8192)
    prompts = random_prompts(work, hf_model.config.vocab_size)
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in work.output_lens]
    # Warm-up: the first prompts, as long as in the run, so that every kernel the run needs (a
    # full chunk of prefill included) is compiled before the clock starts; then one prompt alone,
    # because a step of few sequences plans other split-K partitions (``ops.triton_attention._plan``),
    # which the memory-bound runs, with their small batches, would otherwise compile on the clock.
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:64], warm, use_tqdm=False)
    llm.generate(prompts[:1], warm, use_tqdm=False)
    torch.cuda.synchronize()
    # A pass of a fraction of a second reads the host's speed of the moment (the same code ran the
    # uniform cell at 87K and 134K tok/s in two processes: notes/engine.md). So a cell runs 1, 3
    # or 5 passes, until MIN_SECONDS are measured, and reports the median pass; the CSV has the
    # number of passes and the slowest and fastest.
    passes = []
    while not passes or (len(passes) < MAX_PASSES and (len(passes) % 2 == 0 or
                                                       sum(p.elapsed for p in passes) < MIN_SECONDS)):
        llm.generate(prompts, params, use_tqdm=False)
        passes.append(llm.stats)
    passes.sort(key=lambda p: p.output_tokens_per_second)
    stats = passes[len(passes) // 2]
    util = stats.kv_utilization
    phases = stats.time_breakdown()
    row = dict(system=f"minipaged {system}", tokens_per_s=stats.output_tokens_per_second,
               requests_per_s=stats.requests_per_second, mean_batch=stats.mean_running,
               kv_utilization=float(np.mean(util)) if util else float("nan"), preemptions=stats.num_preemptions,
               seconds=stats.elapsed, kv_slots=llm.cache.capacity,
               **{f"host_{k}_s": v for k, v in phases.items()})
    row.update(passes=len(passes), tokens_per_s_min=passes[0].output_tokens_per_second,
               tokens_per_s_max=passes[-1].output_tokens_per_second)
    row["_steps"] = stats.steps
    del llm
    torch.cuda.empty_cache()
    return row


def run_hf_continuous(hf_model, work: Workload) -> dict:
    """transformers' continuous batching, one request per prompt with its own output length."""
    from transformers import GenerationConfig

    prompts = random_prompts(work, hf_model.config.vocab_size)
    config = GenerationConfig(max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    hf_model.generation_config = config
    manager = hf_model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for i, (p, o) in enumerate(zip(prompts, work.output_lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o)
        done, tokens = 0, 0
        while done < len(prompts):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped answering")
            if result.is_finished():
                done += 1
                tokens += len(result.generated_tokens)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return dict(system="transformers generate_batch", tokens_per_s=tokens / elapsed,
                requests_per_s=len(prompts) / elapsed, seconds=elapsed)


def run_hf_static(hf_model, work: Workload, batch: int = 64) -> dict:
    """Static batching: batches of 64, left-padded, each run until its longest output is done."""
    prompts = random_prompts(work, hf_model.config.vocab_size, low=1)
    tokens = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        chunk, outs = prompts[first:first + batch], work.output_lens[first:first + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=hf_model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=hf_model.device)
        hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens += sum(outs)  # the padding tokens past a request's own length do not count
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return dict(system="transformers generate (static, batch 64)", tokens_per_s=tokens / elapsed,
                requests_per_s=len(prompts) / elapsed, seconds=elapsed)


def roofline_seconds(steps, hf_model, bandwidth_tbs: float, tflops: float) -> float:
    """Sum over steps of max(bytes / bandwidth, FLOPs / matmul rate)."""
    config = hf_model.config
    params = sum(p.numel() for p in hf_model.parameters())
    weight_bytes = 2 * params
    kv_token_bytes = kv_bytes_per_token(**kv_shape(config))
    total = 0.0
    for step in steps:
        memory = (weight_bytes + kv_token_bytes * step.num_cached_tokens) / (bandwidth_tbs * 1e12)
        compute = 2 * params * step.num_batched_tokens / (tflops * 1e12)
        total += max(memory, compute)
    return total


def plot(rows: list[dict], path: Path, gpu: str) -> None:
    """A row of panels per model, one panel per workload: output tokens/s of each system."""
    from minipaged.experiments.plotting import plt, save

    rows = [r for r in rows if "tokens_per_s" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(len(models), len(workloads), figsize=(3.6 * len(workloads), 2.9 * len(models)),
                             squeeze=False)
    for ax_row, model in zip(axes, models):
        for ax, workload in zip(ax_row, workloads):
            mine = [r for r in rows if (r["model"], r["workload"]) == (model, workload)]
            budget = mine[0]["budget"] if mine else ""
            labels = [r["system"].removeprefix("minipaged ").replace("transformers ", "HF ")
                      + ("" if r["budget"] == budget else "\n(its own KV space)") for r in mine]
            colors = ["tab:blue" if r["system"] == "minipaged paged" else
                      "tab:orange" if r["system"].startswith("minipaged") else "tab:gray" for r in mine]
            values = [float(r["tokens_per_s"]) for r in mine]
            ax.barh(labels, values, color=colors)
            for y, value in enumerate(values):
                ax.text(value, y, f" {value:,.0f}", va="center", fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 1.3 * max(values, default=1))
            ax.xaxis.set_major_locator(plt.MaxNLocator(4))
            ax.set_title(f"{model}: {workload}\n({budget} KV space)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("output tokens / s", fontsize=7)
    fig.suptitle(f"Serving throughput, {gpu}", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = gpu_parser(__doc__, quick="a few requests per workload (a smoke run)")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b-shape"],
                        choices=["smollm2-135m", "llama-1b-shape"])
    parser.add_argument("--kv-slots", type=integer(at_least=2048), default=16384,
                        help="token slots of the memory-bound runs (at least one request of 2048 tokens)")
    parser.add_argument("--max-num-seqs", type=integer(at_least=1), default=256)
    parser.add_argument("--subset", type=integer(at_least=1), default=128,
                        help="requests of a mixed-length workload for transformers' continuous batching")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' baselines")
    parser.add_argument("--replot", nargs="+", type=Path, metavar="CSV",
                        help="run nothing: merge these throughput CSVs (e.g. one per model) into --out and draw them")
    args = parser.parse_args(argv)
    if args.replot:
        rows = [row for path in args.replot for row in read_rows(path)]
        write_results(rows, args.out, rows[0]["gpu"])
        return
    if not torch.cuda.is_available():
        parser.error("this experiment measures GPU throughput: it needs a CUDA GPU")
    device = torch.device("cuda")
    bandwidth, tflops = copy_bandwidth(device, None, 1 << 30), matmul_tflops(device, torch.bfloat16, cuda_graph_timer)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bandwidth:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    rows = []
    for model_name in args.models:
        hf_model = make_model(model_name, device)
        for work in workloads(args.quick):
            # Every system runs every request, in both budgets; only transformers' slow continuous
            # batching on mixed lengths runs the first --subset of them. (A memory-bound run of a
            # subset ends in a long drain, where every system runs its last few requests at the
            # same small batch: it understates what paging gains in a steady stream.)
            small = work.head(args.subset)
            runs = [("paged", None, work)] + [(system, args.kv_slots, work) for system in SYSTEMS]
            for system, kv_slots, requests in runs:
                row = run_minipaged(hf_model, system, requests, kv_slots, args.max_num_seqs)
                steps = row.pop("_steps")
                row["roofline_fraction"] = roofline_seconds(steps, hf_model, bandwidth, tflops) / row["seconds"]
                row["budget"] = "large" if kv_slots is None else "memory-bound"
                rows.append(dict(model=model_name, workload=requests.name, **row))
                print(rows[-1])
            if args.no_hf:
                continue
            if len(set(work.output_lens)) == 1:  # equal lengths: every request, and static batching too
                baselines = [(run_hf_continuous, work), (run_hf_static, work)]
            else:  # mixed lengths: static batching would idle on padding; continuous is slow, so a subset
                baselines = [(run_hf_continuous, small)]
            for baseline, requests in baselines:
                try:
                    row = baseline(hf_model, requests)
                except Exception as e:  # a peer's API that changed: say so, keep the run going
                    row = dict(system=baseline.__name__, error=f"{type(e).__name__}: {e}"[:200])
                rows.append(dict(model=model_name, workload=requests.name, budget="large", **row))
                print(rows[-1])
        del hf_model
        torch.cuda.empty_cache()
    write_results([{"gpu": gpu, **row} for row in rows], args.out, gpu)


def write_results(rows: list[dict], out: Path, gpu: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (out / "throughput.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "throughput.png", gpu)


def read_rows(path: Path) -> list[dict]:
    """A throughput CSV's rows, numbers as floats, empty cells left out."""
    def value(text: str) -> object:
        try:
            return float(text)
        except ValueError:
            return text

    with path.open() as f:
        return [{key: value(text) for key, text in row.items() if text != ""} for row in csv.DictReader(f)]


if __name__ == "__main__":
    main()
