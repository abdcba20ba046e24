"""What sharing saves: parallel sampling, beam search and shared prefixes (paper §4.4, §6.3, §6.4).

Sequences of one request share the blocks of their common history (§4.4): the ``n`` samples of
a prompt share the prompt, the beams of a beam search share everything up to where they part.
The real model serves real requests, so how long beams stay together is the model's doing.

* **Figure 15, memory saved**: per step, the blocks in the sequences' block tables (what they
  would hold without sharing, a shared block once per table) against the distinct blocks in use;
  saving = 1 - used / in tables, summed over the run's steps. Parallel sampling n = 2, 4, 6 and
  beam width 2, 4, 6, on Alpaca-like and ShareGPT-like lengths, EOS ignored (every sequence runs
  to the request's output length, as the paper's traces fix it).
* **Figure 14, throughput with sharing**: n = 4 sampling and beam width 4 on the paged cache
  against the contiguous one (whose samples and beams each hold a slab, copied on fork) at the
  same KV budget, small enough that memory limits the batch.
* **§6.4, shared prefix**: a one-shot (80 tokens) and a five-shot (341 tokens) prefix before every
  prompt; throughput and the prompt tokens actually computed, with and without prefix caching.
* **A beam search's block tables**, step by step (``minipaged.viz``): a still and a GIF.

    python -m minipaged.experiments.sharing --out DIR [--quick]

``--quick`` shrinks every size so that it runs on a CPU in a minute or two.
Writes DIR/sharing_savings.csv/.png, sharing_throughput.csv/.png, shared_prefix.csv/.png and
beam_block_tables.png/.gif.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from minipaged.engine import LLM, BeamSearchParams, SamplingParams
from minipaged.experiments import paper, plotting
from minipaged.experiments.cli import gpu_parser, write_csv
from minipaged.workloads import sample_lengths

MODEL = "smollm2-135m"
WIDTHS = (2, 4, 6)


def requests(dataset: str, num_requests: int, max_len: int, vocab_size: int, seed: int = 0):
    """``(prompts, output lengths)``: a dataset's lengths (prompt + output <= ``max_len``) with
    random token ids as prompts (seeded, the same for every system)."""
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # a small max_len trims the long tail; the CSV says which max_len
        warnings.simplefilter("ignore")
        prompt_lens, output_lens = sample_lengths(dataset, num_requests, rng, max_len)
    prompts = [rng.integers(0, vocab_size, p).tolist() for p in prompt_lens]
    return prompts, output_lens.tolist()


def params_for(kind: str, width: int, max_tokens: int, seed: int) -> SamplingParams | BeamSearchParams:
    if kind == "beam":
        return BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(n=width, max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)


def serve(llm: LLM, kind: str, width: int, prompts: list, output_lens: list[int]):
    """Every request through ``llm`` as parallel sampling or beam search; returns ``llm.stats``."""
    params = [params_for(kind, width, n, seed) for seed, n in enumerate(output_lens)]
    if kind == "beam":
        llm.beam_search(prompts, params, use_tqdm=False)
    else:
        llm.generate(prompts, params, use_tqdm=False)
    return llm.stats


def saving(stats) -> float:
    """Share of the blocks in block tables that sharing saved, over the run (percent)."""
    in_tables = sum(step.num_table_blocks for step in stats.steps)
    used = sum(step.num_used_blocks for step in stats.steps)
    return 100.0 * (1 - used / in_tables) if in_tables else float("nan")


def savings_rows(model, *, datasets: tuple[str, ...], num_requests: int, max_len: int,
                 widths: tuple[int, ...] = WIDTHS, device=None, dtype=None) -> list[dict]:
    """Figure 15: memory saved by sharing per (dataset, parallel sampling or beam search, width),
    with KV space to spare (nothing preempted)."""
    llm = LLM(model, block_size=16, max_model_len=max_len, device=device, dtype=dtype)
    rows = []
    for dataset in datasets:
        prompts, output_lens = requests(dataset, num_requests, max_len, llm.model.config.vocab_size)
        for kind in ("parallel", "beam"):
            for width in widths:
                stats = serve(llm, kind, width, prompts, output_lens)
                paper_value = paper.FIGURE_15[kind].get(width) if dataset == "alpaca" else None
                rows.append(dict(dataset=dataset, kind=kind, width=width, saving_percent=saving(stats),
                                 paper_percent=paper_value, num_requests=num_requests, max_len=max_len,
                                 preemptions=stats.num_preemptions))
    return rows


def savings_figure(rows: list[dict]):
    """Saving against width, one panel per kind, one line per dataset, the paper's Alpaca bars beside."""
    fig, axes = plotting.plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind, title in zip(axes, ("parallel", "beam"), ("parallel sampling (n)", "beam search (width)")):
        for dataset in sorted({r["dataset"] for r in rows}):
            mine = [r for r in rows if r["kind"] == kind and r["dataset"] == dataset]
            ax.plot([r["width"] for r in mine], [r["saving_percent"] for r in mine], "o-",
                    label=f"minipaged, {dataset}")
        widths = sorted(paper.FIGURE_15[kind])
        ax.bar(widths, [paper.FIGURE_15[kind][w] for w in widths], width=0.6, color="#cccccc",
               label="paper, Alpaca (OPT-13B)", zorder=0)
        low, high = paper.FIGURE_15_SHAREGPT[kind]
        ax.axhspan(low, high, color="#f2c6a0", alpha=0.35, label="paper, ShareGPT range", zorder=0)
        ax.set(title=title, xlabel="sequences per request", xticks=widths)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KV blocks saved by sharing (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Figure 15: memory saved by sharing blocks")
    fig.tight_layout()
    return fig


def throughput_rows(model, *, num_requests: int, max_len: int, kv_slots: int, max_num_seqs: int,
                    device=None, dtype=None) -> list[dict]:
    """Figure 14: n = 4 sampling and beam width 4, paged vs contiguous at the same KV budget (Alpaca-like)."""
    rows = []
    for system in ("paged", "contiguous-oracle", "contiguous-max"):
        kv_cache, _, reservation = system.partition("-")
        llm = LLM(model, kv_cache, reservation=reservation or "max", block_size=16, num_blocks=kv_slots // 16,
                  max_model_len=max_len, max_num_seqs=max_num_seqs, device=device, dtype=dtype)
        prompts, output_lens = requests("alpaca", num_requests, max_len, llm.model.config.vocab_size)
        for kind in ("parallel", "beam"):
            serve(llm, kind, 2, prompts[:4], [2] * 4)  # warm-up: kernels compiled before the clock starts
            stats = serve(llm, kind, 4, prompts, output_lens)
            rows.append(dict(system=system, kind=kind, width=4, requests_per_s=stats.requests_per_second,
                             tokens_per_s=stats.output_tokens_per_second, mean_batch=stats.mean_running,
                             preemptions=stats.num_preemptions, seconds=stats.elapsed, kv_slots=llm.cache.capacity,
                             num_requests=num_requests))
        del llm
    return rows


def throughput_figure(rows: list[dict]):
    fig, ax = plotting.plt.subplots(figsize=(7, 4))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for i, kind in enumerate(("parallel", "beam")):
        values = [next(r["requests_per_s"] for r in rows if r["system"] == s and r["kind"] == kind) for s in systems]
        ax.bar(np.arange(len(systems)) + 0.4 * i, values, width=0.4,
               label="parallel sampling, n = 4" if kind == "parallel" else "beam search, width 4")
    ax.set_xticks(np.arange(len(systems)) + 0.2, systems)
    ax.set(ylabel="requests / s", title=f"Figure 14: throughput with sharing, {rows[0]['kv_slots']:,} KV slots")
    ax.legend()
    fig.tight_layout()
    return fig


def prefix_rows(model, *, num_requests: int, max_len: int, kv_slots: int, device=None, dtype=None) -> list[dict]:
    """§6.4: a few-shot prefix shared by every prompt, with and without prefix caching (and the
    contiguous Oracle baseline, the paper's Orca): output tokens/s and prompt tokens computed."""
    rows = []
    for shots, (prefix_len, paper_speedup) in paper.SHARED_PREFIX.items():
        for system, caching in (("contiguous-oracle", False), ("paged", False), ("paged", True)):
            kv_cache, _, reservation = system.partition("-")
            llm = LLM(model, kv_cache, reservation=reservation or "max", block_size=16, num_blocks=kv_slots // 16,
                      max_model_len=max_len, enable_prefix_caching=caching, device=device, dtype=dtype)
            vocab = llm.model.config.vocab_size
            prefix = np.random.default_rng(7).integers(0, vocab, prefix_len).tolist()
            prompts, output_lens = requests("alpaca", num_requests, max_len - prefix_len, vocab)
            prompts = [prefix + p for p in prompts]
            params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
            # Warm-up (kernels compiled before the clock starts) on the prefix alone: with prefix
            # caching its full blocks are then cached, as a system prompt already served would be.
            llm.generate([prefix + [1]] * 2, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
            llm.generate(prompts, params, use_tqdm=False)
            stats = llm.stats
            fed = sum(step.num_batched_tokens for step in stats.steps)
            prompt_tokens = fed - sum(n - 1 for n in output_lens)  # every output token but the last is fed back
            rows.append(dict(shots=shots, prefix_len=prefix_len, system=system, prefix_caching=caching,
                             tokens_per_s=stats.output_tokens_per_second, requests_per_s=stats.requests_per_second,
                             prompt_tokens_computed=prompt_tokens, prompt_tokens=stats.num_prompt_tokens,
                             mean_batch=stats.mean_running, paper_speedup_over_oracle=paper_speedup,
                             num_requests=num_requests, kv_slots=llm.cache.capacity))
            del llm
    return rows


def prefix_figure(rows: list[dict]):
    fig, (speed, work) = plotting.plt.subplots(1, 2, figsize=(10, 4))
    shots = list(dict.fromkeys(r["shots"] for r in rows))
    labels = ["contiguous-oracle", "paged", "paged + prefix caching"]
    for i, label in enumerate(labels):
        mine = [r for r in rows if (r["system"] + (" + prefix caching" if r["prefix_caching"] else "")) == label]
        x = np.arange(len(shots)) + 0.27 * i
        speed.bar(x, [r["requests_per_s"] for r in mine], width=0.27, label=label)
        work.bar(x, [r["prompt_tokens_computed"] for r in mine], width=0.27, label=label)
    # The paper's gain over Orca (Oracle), applied to our Oracle bar, beside our prefix-caching bar.
    oracle = [next(r for r in rows if r["shots"] == s and r["system"] == "contiguous-oracle") for s in shots]
    speed.plot(np.arange(len(shots)) + 0.54, [r["requests_per_s"] * r["paper_speedup_over_oracle"] for r in oracle],
               "k*", markersize=12, label="paper: vLLM's gain over Oracle, on our Oracle")
    for ax in (speed, work):
        ax.set_xticks(np.arange(len(shots)) + 0.27, [f"{s} ({r['prefix_len']} tokens)" for s, r in zip(shots, oracle)])
        ax.set_xlabel("shared prefix")
    speed.set(ylabel="requests / s", title="throughput")
    work.set(ylabel="prompt tokens computed", title="prefill work")
    speed.legend(fontsize=8)
    fig.suptitle("§6.4: a shared few-shot prefix (paper: vLLM 1.67x / 3.58x over Orca Oracle)")
    fig.tight_layout()
    return fig


def beam_block_tables(model, out: Path, *, beam_width: int = 4, max_tokens: int = 10, device=None, dtype=None):
    """One beam search on a small pool of 4-slot blocks, recorded step by step: the still of the
    first step with a copy-on-write, and the whole search as a GIF."""
    from minipaged import viz

    llm = LLM(model, block_size=4, num_blocks=48, max_model_len=128, device=device, dtype=dtype)
    recorder = viz.Recorder("beam step {step}")
    llm.engine.observers.append(recorder)
    prompt = llm.tokenizer.encode("The best thing about paging is") if llm.tokenizer else list(range(1, 9))
    llm.beam_search([prompt], BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens), use_tqdm=False)
    snaps = recorder.snapshots
    step = next((k for k in range(1, len(snaps)) if viz.changes(snaps[k - 1], snaps[k]).copied), len(snaps) - 1)
    fig = viz.draw(snaps[step], previous=snaps[step - 1])
    plotting.save(fig, out / "beam_block_tables.png")
    viz.animate(snaps, out / "beam_block_tables.gif", fps=2)
    return snaps


def main(argv: list[str] | None = None) -> None:
    parser = gpu_parser(__doc__, "small sizes that run on a CPU in a minute or two")
    parser.add_argument("--model", default=MODEL, help="a built-in model name or a local directory")
    args = parser.parse_args(argv)
    quick, out = args.quick, args.out
    out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    sizes = dict(datasets=("alpaca",), num_requests=4, max_len=96) if quick else \
        dict(datasets=("alpaca", "sharegpt"), num_requests=48, max_len=1024)
    rows = savings_rows(args.model, **sizes)
    write_csv(out / "sharing_savings.csv", rows)
    plotting.save(savings_figure(rows), out / "sharing_savings.png")
    _print(rows, f"Figure 15 ({where})")
    rows = throughput_rows(args.model, num_requests=6 if quick else 128, max_len=96 if quick else 1024,
                           kv_slots=1024 if quick else 8192, max_num_seqs=24 if quick else 256)
    write_csv(out / "sharing_throughput.csv", rows)
    plotting.save(throughput_figure(rows), out / "sharing_throughput.png")
    _print(rows, f"Figure 14 ({where})")
    rows = prefix_rows(args.model, num_requests=6 if quick else 256, max_len=512 if quick else 1024,
                       kv_slots=4096 if quick else 16384)
    write_csv(out / "shared_prefix.csv", rows)
    plotting.save(prefix_figure(rows), out / "shared_prefix.png")
    _print(rows, f"§6.4 shared prefix ({where})")
    beam_block_tables(args.model, out)
    print(f"wrote {out}/sharing_*.csv|png, shared_prefix.csv|png, beam_block_tables.png|gif")


def _print(rows: list[dict], title: str) -> None:
    print(title)
    keys = list(rows[0])
    print("  ".join(keys))
    for row in rows:
        print("  ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()
