"""Recompute or swap? The cost of bringing a preempted request back (paper §4.5, §7.3, Fig. 19).

When GPU blocks run out, the scheduler evicts a request in one of two ways: *swapping* copies its
blocks to CPU memory and back later; *recomputation* drops them and prefills the request's tokens
again. For one request of ``--tokens`` tokens, over block sizes 1 to 256, on a GPU:

* ``recompute``: one prefill forward pass of the model over the request's tokens (into the cache);
* ``swap (one transfer)``: ``swap_out`` then ``swap_in`` as minipaged does them: the scattered
  blocks are gathered into one staging buffer, moved in one copy each way, and scattered;
* ``swap (a copy per block)``: the same blocks moved with one ``cudaMemcpyAsync`` per block per
  layer, as the paper's vLLM did; many small copies are what made small blocks slow there.

The paper found recomputation's cost flat in the block size and never above 20% of swapping's
at small blocks (Fig. 19): swapping pays per block. The model is a random-weight model of
Llama-3.2-1B's shape in bfloat16 (16 layers, 8 KV heads of dimension 64: 32 KB of K/V per token).

``run`` also takes ``device="cpu"`` and a smaller shape, so that a notebook can draw the chart
without a GPU; there "swap" copies host memory to host memory (no PCIe), so only the cost of many
small copies against one large one carries over, not the GPU's numbers.

    python -m minipaged.experiments.preemption --out DIR [--quick]

Writes DIR/preemption.csv and DIR/preemption.png.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minipaged.experiments.cli import gpu_parser
from minipaged.kv import PagedKVCache
from minipaged.kv.block_allocator import blocks_needed

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A model small enough to recompute in milliseconds on a CPU (2 layers, one KV head of dimension 64).
SMALL_SHAPE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median wall-clock milliseconds of ``fn`` (a GPU synchronised after each call)."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_per_block(cache: PagedKVCache, seq_id: int) -> None:
    """Out and back in, one copy per block per layer (the paper's swap)."""
    table = cache.block_table(seq_id)
    for layer in range(cache.num_layers):
        for gpu, cpu in ((cache.k_caches[layer], cache.cpu_pool.k_caches[layer]),
                         (cache.v_caches[layer], cache.cpu_pool.v_caches[layer])):
            for i, block in enumerate(table):
                cpu[i].copy_(gpu[block], non_blocking=True)
            for i, block in enumerate(table):
                gpu[block].copy_(cpu[i], non_blocking=True)


def measure(model, num_tokens: int, block_size: int, reps: int) -> dict:
    config = model.config
    weight = next(model.parameters())
    device = weight.device
    num_blocks = blocks_needed(num_tokens, block_size)
    cache = PagedKVCache(num_blocks, block_size, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                         head_dim=config.head_dim, dtype=weight.dtype, device=device, max_seq_len=num_tokens,
                         num_cpu_blocks=num_blocks)
    cache.allocate(0, num_tokens)
    ids = torch.randint(0, config.vocab_size, (num_tokens,), device=device)
    positions = torch.arange(num_tokens, device=device)
    metadata = cache.attention_metadata([0], [num_tokens])

    def swap() -> None:
        cache.swap_out([0])
        cache.swap_in([0])

    with torch.inference_mode():
        recompute = timed(lambda: model(ids, positions, cache, metadata), reps, device)
    return dict(block_size=block_size, tokens=num_tokens, recompute_ms=recompute,
                swap_one_transfer_ms=timed(swap, reps, device),
                swap_per_block_ms=timed(lambda: copy_per_block(cache, 0), reps, device))


def run(num_tokens: int, reps: int, device: str | torch.device = "cuda", shape: dict | None = None,
        block_sizes: tuple[int, ...] = BLOCK_SIZES) -> list[dict]:
    """One row per block size: the three ways of bringing back one request of ``num_tokens`` tokens,
    on a random model of ``shape`` (transformers' LlamaConfig arguments; default Llama-3.2-1B's,
    ``SMALL_SHAPE`` for a CPU) in bfloat16 on a GPU, float32 on a CPU."""
    from transformers import LlamaConfig

    from minipaged.experiments.throughput import LLAMA_1B_SHAPE
    from minipaged.model import random_model

    model = random_model(LlamaConfig(**(shape or LLAMA_1B_SHAPE)), device=device)[0]
    return [measure(model, num_tokens, block_size, reps) for block_size in block_sizes]


def figure(rows: list[dict], device_name: str):
    """Latency against block size, one line per way (log-log); returns the matplotlib figure."""
    from minipaged.experiments.plotting import plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    sizes = [r["block_size"] for r in rows]
    for key, label, style in [("recompute_ms", "recompute", "o-"),
                              ("swap_one_transfer_ms", "swap (one transfer, minipaged)", "s-"),
                              ("swap_per_block_ms", "swap (a copy per block, as in the paper)", "^--")]:
        ax.plot(sizes, [r[key] for r in rows], style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="block size (tokens)", ylabel="latency (ms)",
           title=f"Bringing back a {rows[0]['tokens']}-token request ({device_name})")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend()
    return fig


def plot(rows: list[dict], path: Path, gpu: str) -> None:
    from minipaged.experiments.plotting import save

    save(figure(rows, gpu), path)


def main(argv: list[str] | None = None) -> None:
    parser = gpu_parser(__doc__, quick="a 256-token request, 3 repetitions")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this experiment times GPU <-> CPU copies and a GPU forward pass: it needs a CUDA GPU")
    num_tokens, reps = (256, 3) if args.quick else (2048, 10)
    rows = run(num_tokens, reps)
    gpu = torch.cuda.get_device_name()
    for row in rows:
        print(row)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "preemption.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["gpu", *rows[0]])
        writer.writeheader()
        writer.writerows({"gpu": gpu, **row} for row in rows)
    plot(rows, args.out / "preemption.png", gpu)


if __name__ == "__main__":
    main()
