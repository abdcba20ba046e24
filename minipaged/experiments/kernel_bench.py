"""Decode-attention kernels against the memory-bandwidth floor (paper §7.1, Fig. 18a).

Decode attention reads every cached key and value once and does only a few FLOPs per byte (4
for Llama-3-8B, whose 4 query heads share each KV head; notes/kernels.md), far below what the
GPU could compute per byte, so its floor is ``K+V bytes / memory bandwidth``. This benchmark
times, on the same data:

* ``paged``: ``minipaged.ops.paged_decode_attention`` through random block tables;
* ``contiguous``: the same Triton kernel reading one slab per sequence;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on a padded contiguous
  cache ``[batch, H_kv, max_len, D]`` (with a mask when lengths vary), ``enable_gqa=True``;
* ``flex_paged``: FlexAttention's paged attention
  (``torch.nn.attention.experimental._paged_attention``), compiled, on a subset of shapes;

and reports latency and achieved bandwidth (K+V bytes actually needed / time). On a GPU each
call is captured in a CUDA graph and replayed 60 times, each replay after an L2 flush (a 256 MB
buffer read), with CUDA events around the replay only; latency is the median
(``cuda_graph_timer``), so it is device time, and the CPU time to issue a call is reported
apart (``host_us``). A function "as called" from a notebook pays that host time too:
``called_us`` times each call with ``triton.testing.do_bench`` (no graph, host work
included), and ``host_python_us`` is the Python side of our calls alone (checks, launch plan,
output allocation) with the launches (``ops.launch``) replaced by no-ops, so ``host_us -
host_python_us`` is what launching costs. Next to it stands the device-to-device copy
bandwidth (bytes read + written) measured in the same run with ``triton.testing.do_bench``. On
a CPU (``--quick``) calls are timed by the wall clock, median of 3.

Prefill (``kernel_prefill.csv``, ``kernel_prefill.png``): ``paged_prefill_attention`` against
SDPA (flash backend, causal; lower-right causal over a cached prefix) on the same tokens, for
1-16 sequences of 512-8K new tokens with and without a 2K-token cached prefix, and with lengths
that vary (SDPA right-padded), in TFLOP/s of the causal attention the real tokens need.
``--tune`` and ``--tune-prefill`` sweep the launch parameters instead (``kernel_tune*.csv``).

    python -m minipaged.experiments.kernel_bench --out DIR           # on a GPU
    python -m minipaged.experiments.kernel_bench --out DIR --quick   # tiny smoke run, any device

Writes ``DIR/kernel_bench.csv``, ``DIR/kernel_bandwidth.png``, ``DIR/kernel_block_size.png``,
``DIR/kernel_prefill.csv``, ``DIR/kernel_prefill.png``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from minipaged.ops import contiguous_decode_attention, paged_decode_attention, paged_prefill_attention, triton_attention

# Llama-3-8B attention: 32 query heads share 8 KV heads of dimension 128.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
METHODS = ("paged", "contiguous", "sdpa", "flex_paged")


@dataclass
class Shape:
    batch: int
    context: int  # the longest sequence; "variable" draws the others uniformly in [1, context]
    lengths: str  # "uniform" | "variable"
    block_size: int = 16
    flex: bool = False  # FlexAttention compiles per shape: run it on a few shapes only


@dataclass
class Row:
    method: str
    batch: int
    context: int
    lengths: str
    block_size: int
    mean_len: float
    kv_bytes: int
    latency_us: float
    bandwidth_tbps: float
    copy_tbps: float
    rel_err: float
    host_us: float = float("nan")
    called_us: float = float("nan")
    host_python_us: float = float("nan")
    note: str = ""


def full_grid() -> list[Shape]:
    uniform = [(1, c) for c in (512, 2048, 8192, 32768)] + [(8, c) for c in (2048, 8192, 32768)]
    uniform += [(32, c) for c in (512, 2048, 8192, 32768)] + [(128, c) for c in (512, 2048, 8192)]
    uniform += [(256, c) for c in (512, 2048, 4096)]
    flex_shapes = {(1, 2048), (1, 32768), (32, 2048), (32, 8192), (128, 2048)}
    shapes = [Shape(b, c, "uniform", 16, (b, c) in flex_shapes) for b, c in uniform]
    shapes += [
        Shape(b, c, "variable", 16, (b, c) == (32, 8192))
        for b, c in ((8, 32768), (32, 2048), (32, 8192), (128, 2048), (128, 8192))
    ]
    shapes += [Shape(32, 4096, "uniform", bs) for bs in (8, 16, 32, 64, 128, 256)]  # block-size sweep
    shapes += [Shape(1, 32768, "uniform", bs) for bs in (8, 32, 64, 128, 256)]
    return shapes


def quick_grid() -> list[Shape]:
    return [
        Shape(1, 64, "uniform", 16),
        Shape(2, 48, "variable", 8),
        Shape(2, 64, "uniform", 32),
        Shape(2, 64, "uniform", 16),
    ]


def copy_bandwidth(device: torch.device, timer: Callable[[Callable[[], object]], float], numel: int) -> float:
    """Device-to-device copy, counting bytes read plus bytes written, in TB/s.

    Timed with ``triton.testing.do_bench`` on the GPU: one 2 GB copy dwarfs launch overhead.
    """
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        seconds = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    else:
        seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds / 1e12


def cuda_graph_timer(fn: Callable[[], object], reps: int = 60) -> float:
    """Median seconds of ``fn`` with a cold L2: captured in a CUDA graph, replayed after a flush.

    The graph removes Python and launch overhead from the measurement (an engine captures its
    decode step the same way), so kernels are compared on device time alone. Before each
    replay a 256 MB buffer is read, evicting the inputs from L2 (50-60 MB on Hopper). Read, not
    rewritten as ``triton.testing.do_bench`` does: a rewrite leaves L2 full of dirty lines, and
    the timed kernel pays for writing them back. On an H200 that added 1-10 us to every call,
    SDPA's and ours alike (SDPA at 1 x 32K: 48.8 -> 40.7 us; notes/kernels.md, "Stop 28"), a
    cost of the flush, not of the kernel; in a model, attention follows kernels that write little.
    """
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.zeros(128 << 20, dtype=torch.float16, device="cuda")  # 256 MB
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        flush.sum(dtype=torch.float32)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends, strict=True))
    return times[reps // 2] / 1e3


def host_overhead(fn: Callable[[], object], calls: int = 40, rounds: int = 7) -> float:
    """Seconds of CPU time per call to issue ``fn`` (launches are queued, not awaited): the
    median of ``rounds`` rounds of ``calls`` calls, the GPU drained before each round (so the
    queue never fills and makes the host wait). The GPU machine's host is noisy: one round of
    30 calls read anywhere from 37 to 97 us for the same call."""
    fn()
    per_call = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def python_host_time(fn: Callable[[], object], calls: int = 200) -> float:
    """Seconds per call of our own Python (checks, launch plan, output allocation), with the
    kernel launches (``ops.launch``, its key included) replaced by no-ops.

    Index tensors passed on the CPU are value-checked, so on a CPU this includes those checks.
    """
    with mock.patch.object(triton_attention, "launch", lambda *args, **meta: None):
        return host_overhead(fn, calls)


def called_time(fn: Callable[[], object], graph_seconds: float) -> float:
    """Seconds per call as a notebook calls it: on a GPU ``do_bench`` (host work included); on a
    CPU the wall-clock time already measured (``graph_seconds``), which includes the host."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    return graph_seconds


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        return cuda_graph_timer

    def cpu_timer(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    return cpu_timer


def flex_paged_fn(q: Tensor, keys: Tensor, values: Tensor, lens: Tensor, block_size: int) -> Callable[[], Tensor]:
    """FlexAttention's experimental PagedAttention over the same tokens (its own HND page layout)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, max_len = keys.shape[0], keys.shape[2]
    pages_per_seq = triton.cdiv(max_len, block_size)
    n_pages = batch * pages_per_seq
    device = q.device
    paging = PagedAttention(n_pages, block_size, batch, device=str(device))
    for b in range(batch):
        paging.reserve(torch.tensor(b, device=device), torch.tensor(max_len, device=device))
    k_cache = torch.empty(1, NUM_KV_HEADS, n_pages * block_size, HEAD_DIM, device=device, dtype=q.dtype)
    v_cache = torch.empty_like(k_cache)
    positions = torch.arange(max_len, device=device).expand(batch, max_len)
    batch_idx = torch.arange(batch, device=device)
    paging.assign(batch_idx, positions, keys, values, k_cache, v_cache)

    def in_context(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx < lens[b]

    logical = create_block_mask(in_context, batch, None, 1, max_len, device=str(device), BLOCK_SIZE=(128, block_size))
    physical = paging.convert_logical_block_mask(logical, batch_idx)
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)  # static: flex decoding
    query = q.unsqueeze(2)  # [batch, heads, 1, D]
    return lambda: compiled(query, k_cache, v_cache, block_mask=physical, enable_gqa=True)


def bench_shape(
    shape: Shape, device: torch.device, dtype: torch.dtype, timer, copy_tbps: float, generator: torch.Generator
) -> list[Row]:
    batch, bs = shape.batch, shape.block_size
    if shape.lengths == "uniform":
        lens = torch.full((batch,), shape.context, dtype=torch.int32)
    else:
        lens = torch.randint(1, shape.context + 1, (batch,), generator=generator, dtype=torch.int32)
        lens[0] = shape.context
    total = int(lens.sum())
    kv_bytes = 2 * total * NUM_KV_HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype)

    # Padded contiguous cache for SDPA; every layout below is filled from it.
    keys = torch.randn(batch, NUM_KV_HEADS, shape.context, HEAD_DIM, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    positions = torch.arange(shape.context)
    valid = positions[None, :] < lens[:, None]  # [batch, max_len]

    # Contiguous arena: sequences packed one after another.
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)[:-1].long()]).to(torch.int32)
    k_arena = keys.transpose(1, 2)[valid.to(device)].contiguous()  # [total, H_kv, D]
    v_arena = values.transpose(1, 2)[valid.to(device)].contiguous()

    # Paged pool: each sequence's blocks at random places in a pool with no spare blocks.
    blocks_per_seq = triton.cdiv(lens, bs)
    num_blocks = int(blocks_per_seq.sum())
    width = triton.cdiv(shape.context, bs)
    perm = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    table_valid = torch.arange(width)[None, :] < blocks_per_seq[:, None]
    tables[table_valid] = perm
    k_cache = torch.empty(num_blocks, bs, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    padded_slots = (tables.long()[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, : shape.context]
    slots = padded_slots[valid].to(device)
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = k_arena
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = v_arena

    lens_d, starts_d, tables_d = lens.to(device), starts.to(device), tables.to(device)
    mask = None if shape.lengths == "uniform" else valid.to(device)[:, None, None, :]
    sdpa_q = q.unsqueeze(2)

    fns: dict[str, Callable[[], Tensor]] = {
        "paged": lambda: paged_decode_attention(q, k_cache, v_cache, tables_d, lens_d, max_context_len=shape.context),
        "contiguous": lambda: contiguous_decode_attention(
            q, k_arena, v_arena, starts_d, lens_d, max_context_len=shape.context
        ),
        "sdpa": lambda: F.scaled_dot_product_attention(sdpa_q, keys, values, attn_mask=mask, enable_gqa=True),
    }
    notes: dict[str, str] = {}
    if shape.flex:
        try:
            fns["flex_paged"] = flex_paged_fn(q, keys, values, lens_d, bs)
        except Exception as error:  # record why the peer could not run
            notes["flex_paged"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"

    expected = fns["sdpa"]().squeeze(2).float()
    rows = []
    for method in METHODS:
        if method not in fns and method not in notes:
            continue
        if method not in fns:  # could not run here: a row that says why
            seconds, rel_err, host_us, note = float("nan"), float("nan"), float("nan"), notes[method]
            called_us = python_us = float("nan")
        else:
            try:
                out = fns[method]().reshape(batch, NUM_HEADS, HEAD_DIM).float()
                rel_err = ((out - expected).norm() / expected.norm()).item()
                seconds = timer(fns[method])
                host_us = host_overhead(fns[method]) * 1e6 if device.type == "cuda" else float("nan")
                called_us = called_time(fns[method], seconds) * 1e6
                ours = method in ("paged", "contiguous")
                python_us = python_host_time(fns[method]) * 1e6 if ours else float("nan")
                note = ""
            except Exception as error:  # a failing method gets a row that says why
                seconds, rel_err, host_us = float("nan"), float("nan"), float("nan")
                called_us = python_us = float("nan")
                note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        rows.append(
            Row(
                method,
                batch,
                shape.context,
                shape.lengths,
                bs,
                total / batch,
                kv_bytes,
                seconds * 1e6,
                kv_bytes / seconds / 1e12,
                copy_tbps,
                rel_err,
                host_us,
                called_us,
                python_us,
                note,
            )
        )
    return rows


# -- prefill: packed new tokens over a paged context, against SDPA's flash kernel ----------------


@dataclass
class PrefillShape:
    seqs: int
    new: int  # new tokens per sequence (the prompt, or the part of it not cached)
    prefix: int  # tokens already in the cache before them (prefix caching, chunked prefill)
    block_size: int = 16
    lengths: str = "uniform"  # "variable": the others draw their new tokens uniformly in [1, new]

    def __post_init__(self) -> None:
        if self.lengths == "variable" and self.prefix:
            raise ValueError("variable-length prefill is benched without a prefix (SDPA pads on the right)")


@dataclass
class PrefillRow:
    method: str
    seqs: int
    new: int
    prefix: int
    block_size: int
    lengths: str
    tflop: float  # causal attention FLOPs actually needed
    latency_us: float
    tflops: float
    called_us: float
    host_python_us: float
    rel_err: float
    note: str = ""


def prefill_grid() -> list[PrefillShape]:
    shapes = [PrefillShape(s, n, p) for p in (0, 2048) for s in (1, 4, 16) for n in (512, 2048, 8192)]
    return shapes + [PrefillShape(s, n, 0, lengths="variable") for s in (4, 16) for n in (2048, 8192)]


def quick_prefill_grid() -> list[PrefillShape]:
    return [PrefillShape(1, 24, 0, 16), PrefillShape(2, 16, 8, 8), PrefillShape(3, 20, 0, 8, "variable")]


def causal_flops(news: list[int], prefix: int) -> float:
    """Query j (0-based) of a sequence sees prefix + j + 1 keys; 4 FLOPs per head-dim per pair
    (q.k and p.v, a multiply and an add each). ``news``: each sequence's new tokens."""
    pairs = sum(new * prefix + new * (new + 1) // 2 for new in news)
    return 4.0 * NUM_HEADS * HEAD_DIM * pairs


def sdpa_prefill_fn(q: Tensor, keys: Tensor, values: Tensor, new: int, prefix: int) -> Callable[[], Tensor]:
    """SDPA on a GPU through its flash backend (the one a serving stack would use), causal;
    over a cached prefix the mask is lower-right causal (query j sees prefix + j + 1 keys)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    mask = None if prefix == 0 else causal_lower_right(new, new + prefix)
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    def run() -> Tensor:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=prefix == 0,
                                                  enable_gqa=True)  # fmt: skip

    return run


@dataclass
class PrefillProblem:
    """The same tokens held two ways: ``q, keys, values`` as SDPA takes them (``[seqs, heads,
    tokens, dim]``, right-padded when lengths vary) and a paged pool with each sequence's blocks
    at random places (new tokens included: their K/V are written before attention runs)."""

    q: Tensor
    keys: Tensor
    values: Tensor
    news: list[int]  # each sequence's new tokens
    valid: Tensor  # [seqs, new] bool: the padded positions that hold a real token
    paged: Callable[..., Tensor]  # triton_attention.attention on the pool (takes ``config``): [tokens, heads, dim]
    called: Callable[[], Tensor]  # the same through the public, checked paged_prefill_attention

    def packed(self, padded: Tensor) -> Tensor:
        """SDPA's ``[seqs, heads, new, dim]`` output as the kernel's packed ``[tokens, heads, dim]``."""
        return padded.transpose(1, 2)[self.valid]


def prefill_problem(
    shape: PrefillShape, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> PrefillProblem:
    seqs, new, prefix, bs = shape.seqs, shape.new, shape.prefix, shape.block_size
    news = [new] * seqs
    if shape.lengths == "variable":  # the first at the longest, the others uniform in [1, new]
        news[1:] = torch.randint(1, new + 1, (seqs - 1,), generator=generator).tolist()
    length = prefix + new
    keys = torch.randn(seqs, NUM_KV_HEADS, length, HEAD_DIM, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    q = torch.randn(seqs, NUM_HEADS, new, HEAD_DIM, device=device, dtype=dtype)
    width = triton.cdiv(length, bs)
    tables = torch.randperm(seqs * width, generator=generator).to(torch.int32).view(seqs, width).to(device)
    k_cache = torch.empty(seqs * width, bs, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)[:, :length]
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = keys.transpose(1, 2)
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = values.transpose(1, 2)
    lens = torch.tensor(news, dtype=torch.int32, device=device) + prefix
    query_start_loc = torch.tensor([0, *itertools.accumulate(news)], dtype=torch.int32, device=device)
    valid = torch.arange(new, device=device)[None, :] < torch.tensor(news, device=device)[:, None]
    packed_q = q.transpose(1, 2)[valid]

    def paged(config: dict[str, int] | None = None) -> Tensor:
        return triton_attention.attention(
            packed_q, k_cache, v_cache, block_tables=tables, context_lens=lens, query_start_loc=query_start_loc,
            max_context_len=length, max_query_len=new, scale=HEAD_DIM**-0.5, config=config,
        )  # fmt: skip

    def called() -> Tensor:
        return paged_prefill_attention(packed_q, k_cache, v_cache, tables, lens, query_start_loc,
                                       max_context_len=length, max_query_len=new)  # fmt: skip

    return PrefillProblem(q, keys, values, news, valid, paged, called)


def bench_prefill_shape(
    shape: PrefillShape, device: torch.device, dtype: torch.dtype, timer, generator: torch.Generator
) -> list[PrefillRow]:
    """Paged prefill and SDPA on one shape. FLOPs count only the causal pairs of real tokens, so
    when lengths vary SDPA's padding shows as lower throughput."""
    seqs, new, prefix, bs = shape.seqs, shape.new, shape.prefix, shape.block_size
    problem = prefill_problem(shape, device, dtype, generator)
    fns = {"paged": problem.called, "sdpa": sdpa_prefill_fn(problem.q, problem.keys, problem.values, new, prefix)}
    flop = causal_flops(problem.news, prefix)
    expected = None
    rows = []
    for method in ("sdpa", "paged"):
        try:
            out = fns[method]()
            out = problem.packed(out) if method == "sdpa" else out
            if expected is None:
                expected = out.float()
            rel_err = ((out.float() - expected).norm() / expected.norm()).item()
            seconds = timer(fns[method])
            called_us = called_time(fns[method], seconds) * 1e6
            python_us = python_host_time(fns[method], calls=20) * 1e6 if method == "paged" else float("nan")
            note = ""
        except Exception as error:  # a failing method gets a row that says why
            seconds = rel_err = called_us = python_us = float("nan")
            note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        rows.append(PrefillRow(method, seqs, new, prefix, bs, shape.lengths, flop / 1e12, seconds * 1e6,
                               flop / seconds / 1e12, called_us, python_us, rel_err, note))  # fmt: skip
    return rows


def plot_prefill(rows: list[PrefillRow], out_dir: Path, device_name: str) -> None:
    """Throughput of paged prefill and SDPA against the new tokens, one panel per prefix and one
    for variable lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.lengths, r.prefix) for r in rows}, reverse=True)  # uniform first
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, style in (("paged", "-"), ("sdpa", "--")):
            for seqs in sorted({r.seqs for r in rows}):
                pts = sorted((r.new, r.tflops) for r in rows if (r.method, r.seqs, (r.lengths, r.prefix)) ==
                             (method, seqs, panel) and not math.isnan(r.tflops))  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{method}, {seqs} seq")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("new tokens per sequence (the longest, when lengths vary)")
        ax.set_ylabel("causal attention TFLOP/s")
        lengths, prefix = panel
        ax.set_title(f"cached prefix: {prefix} tokens" if lengths == "uniform" else "lengths vary, no prefix")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Prefill attention, 32 q / 8 kv heads, d=128, bf16, block 16 — {device_name}")
    fig.tight_layout()
    fig.savefig(out_dir / "kernel_prefill.png", dpi=120)
    plt.close(fig)


def run_prefill(shapes: list[PrefillShape], device: torch.device, dtype: torch.dtype, timer, out_dir: Path,
                device_name: str) -> list[PrefillRow]:  # fmt: skip
    """Every prefill shape, printed as it goes; writes the CSV and the figure."""
    generator = torch.Generator().manual_seed(1)
    rows: list[PrefillRow] = []
    for shape in shapes:
        pair = bench_prefill_shape(shape, device, dtype, timer, generator)
        rows += pair
        for row in pair:
            print(f"prefill {row.method:>5} seqs={row.seqs:<3} new={row.new:<5} prefix={row.prefix:<5} {row.lengths:<8}"
                  f" {row.latency_us:10.1f} us {row.tflops:7.1f} TFLOP/s called={row.called_us:10.1f} us"
                  f" err={row.rel_err:.1e} {row.note}", flush=True)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(out_dir / "kernel_prefill.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])) + ["device"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), "device": device_name})
    plot_prefill(rows, out_dir, device_name)
    return rows


def plot(rows: list[Row], out_dir: Path, copy_tbps: float, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows if r.lengths == "uniform" and r.block_size == 16})
    batches = [b for b in batches if b in (1, 32, 128)] or batches[:1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for method in METHODS:
            pts = sorted(
                (r.context, r.bandwidth_tbps)
                for r in rows
                if r.method == method
                and r.batch == batch
                and r.lengths == "uniform"
                and r.block_size == 16
                and not math.isnan(r.bandwidth_tbps)
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.axhline(copy_tbps, color="gray", linestyle="--", label="device copy (read+write)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("K+V bytes read / time (TB/s)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Decode attention bandwidth, 32 q / 8 kv heads, d=128, bf16 — {device_name}")
    fig.tight_layout()
    fig.savefig(out_dir / "kernel_bandwidth.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = sorted(
        {
            (r.batch, r.context)
            for r in rows
            if r.lengths == "uniform"
            and len({s.block_size for s in rows if (s.batch, s.context, s.lengths) == (r.batch, r.context, "uniform")})
            > 1
        }
    )
    for batch, context in groups:
        contiguous = {
            r.block_size: r.latency_us
            for r in rows
            if r.method == "contiguous" and (r.batch, r.context, r.lengths) == (batch, context, "uniform")
        }
        paged = {
            r.block_size: r.latency_us
            for r in rows
            if r.method == "paged" and (r.batch, r.context, r.lengths) == (batch, context, "uniform")
        }
        sizes = sorted(set(paged) & set(contiguous))
        ax.plot(
            sizes,
            [100 * (paged[s] / contiguous[s] - 1) for s in sizes],
            marker="o",
            label=f"batch {batch}, context {context}",
        )
    ax.axhline(0, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("paged latency over contiguous (%)")
    ax.set_title(f"Cost of paging vs block size (cf. paper Fig. 18a) — {device_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "kernel_block_size.png", dpi=120)
    plt.close(fig)


TUNE_SHAPES = [
    (1, 2048, 16),
    (1, 8192, 16),
    (1, 32768, 16),
    (1, 32768, 8),
    (8, 8192, 16),
    (8, 32768, 16),
    (32, 2048, 16),
    (32, 8192, 16),
    (128, 2048, 16),
]  # (batch, context, block size)


def tune(device: torch.device, timer, out_dir: Path, shapes: list[tuple[int, int, int]] = TUNE_SHAPES) -> None:
    """Time launch-parameter variants of the paged and contiguous kernel on a few shapes.

    Each variant changes the default configuration (``_launch_config``) in one place: the
    context tile, warps, pipeline stages or split-K programs per multiprocessor. This is how the
    defaults were chosen (notes/kernels.md).
    """
    from minipaged.ops import triton_attention

    variants: list[tuple[str, dict]] = [
        ("default", {}),
        ("stages3", {"num_stages": 3}),
        ("stages1", {"num_stages": 1}),
        ("warps8", {"num_warps": 8}),
        ("tile_x2", {"TILE": 2}),
        ("tile_half", {"TILE": 0.5}),
        ("per_sm2", {"programs_per_sm": 2}),
        ("per_sm8", {"programs_per_sm": 8}),
        ("per_sm1", {"programs_per_sm": 1}),
    ]
    results = []
    for batch, context, bs in shapes:
        tokens = batch * context
        num_blocks = tokens // bs
        k_cache = torch.randn(num_blocks, bs, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, -1)
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        starts = torch.arange(batch, device=device, dtype=torch.int32) * context
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        kv_bytes = 2 * tokens * NUM_KV_HEADS * HEAD_DIM * 2
        default = triton_attention._launch_config(
            batch, NUM_KV_HEADS, HEAD_DIM * 2, context, device, varied_lengths=False
        )
        for layout in ("paged", "contiguous"):
            for name, change in variants:
                config = dict(default)
                for key, value in change.items():
                    config[key] = int(config[key] * value) if key == "TILE" else value
                per_sm = config.pop("programs_per_sm")
                size = triton_attention.choose_partition_size(
                    batch, NUM_KV_HEADS, context, device, config["TILE"], per_sm
                )
                caches = (k_cache, v_cache) if layout == "paged" else (k_cache.flatten(0, 1), v_cache.flatten(0, 1))
                paged = layout == "paged"
                fn = functools.partial(
                    triton_attention.attention,
                    q,
                    *caches,
                    block_tables=tables if paged else None,
                    starts=None if paged else starts,
                    context_lens=lens,
                    query_start_loc=None,
                    max_context_len=context,
                    scale=HEAD_DIM**-0.5,
                    partition_size=size,
                    config=config,
                )
                try:
                    seconds = timer(fn)
                except Exception as error:  # e.g. a tile too large for shared memory
                    print(f"  {layout} {name} failed: {type(error).__name__}", flush=True)
                    continue
                results.append((batch, context, bs, layout, name, seconds * 1e6, kv_bytes / seconds / 1e12))
                print(
                    f"b={batch:<4} ctx={context:<6} bs={bs:<3} {layout:>10} {name:>12}: {seconds * 1e6:8.1f} us "
                    f"{kv_bytes / seconds / 1e12:5.2f} TB/s",
                    flush=True,
                )
        del k_cache, v_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(out_dir / "kernel_tune.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["batch", "context", "block_size", "layout", "variant", "latency_us", "bandwidth_tbps"])
        writer.writerows(results)


PREFILL_TUNE_SHAPES = [PrefillShape(s, n, p) for s, n, p in ((1, 512, 0), (1, 8192, 0), (4, 2048, 0), (16, 512, 2048))]


PREFILL_TUNE_CONFIGS = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))  # rows, tile, warps, stages


def tune_prefill(device: torch.device, timer, out_dir: Path, shapes: list[PrefillShape] = PREFILL_TUNE_SHAPES,
                 configs: list[tuple[int, int, int, int]] = PREFILL_TUNE_CONFIGS) -> None:  # fmt: skip
    """Time prefill launch shapes (query rows, context tile, warps, stages) on a few shapes and
    write ``kernel_tune_prefill.csv``; this is how ``_prefill_config`` was chosen."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for shape in shapes:
        problem = prefill_problem(shape, device, torch.bfloat16, generator)
        sdpa = sdpa_prefill_fn(problem.q, problem.keys, problem.values, shape.new, shape.prefix)
        expected = problem.packed(sdpa()).float()
        flop = causal_flops(problem.news, shape.prefix)
        for block_m, tile, warps, stages in configs:
            config = {"BLOCK_M": block_m, "TILE": tile, "num_warps": warps, "num_stages": stages}
            try:
                fn = functools.partial(problem.paged, config=config)
                rel_err = ((fn().float() - expected).norm() / expected.norm()).item()
                seconds = timer(fn)
            except Exception as error:  # e.g. tiles too large for shared memory
                print(f"  {config} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
                continue
            results.append((shape.seqs, shape.new, shape.prefix, block_m, tile, warps, stages, seconds * 1e6,
                            flop / seconds / 1e12, rel_err))  # fmt: skip
            print(f"seqs={shape.seqs:<3} new={shape.new:<5} prefix={shape.prefix:<5} {config}: {seconds * 1e6:9.1f} us"
                  f" {flop / seconds / 1e12:6.1f} TFLOP/s err={rel_err:.1e}", flush=True)  # fmt: skip
        del problem
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(out_dir / "kernel_tune_prefill.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seqs", "new", "prefix", "BLOCK_M", "TILE", "num_warps", "num_stages", "latency_us", "tflops",
                         "rel_err"])  # fmt: skip
        writer.writerows(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test on any device")
    parser.add_argument("--tune", action="store_true", help="sweep the decode kernel's launch parameters instead")
    parser.add_argument("--tune-prefill", action="store_true", help="sweep the prefill launch parameters instead")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles per shape)")
    parser.add_argument("--no-prefill", action="store_true", help="decode only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    timer = make_timer(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    copy_tbps = copy_bandwidth(device, timer, 1 << (30 if device.type == "cuda" else 20))
    print(f"device: {device_name}; copy bandwidth {copy_tbps:.2f} TB/s (read + write)", flush=True)

    if args.tune:
        tune(device, timer, args.out)
        return
    if args.tune_prefill:
        tune_prefill(device, timer, args.out)
        return
    generator = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for shape in quick_grid() if args.quick else full_grid():
        if args.no_flex:
            shape.flex = False
        rows += bench_shape(shape, device, dtype, timer, copy_tbps, generator)
        for row in rows[-len(METHODS) :]:
            if row.batch == shape.batch and row.context == shape.context and row.block_size == shape.block_size:
                print(
                    f"{row.method:>11} b={row.batch:<4} ctx={row.context:<6} {row.lengths:<8} bs={row.block_size:<4}"
                    f" {row.latency_us:9.1f} us {row.bandwidth_tbps:6.2f} TB/s err={row.rel_err:.1e}"
                    f" host={row.host_us:6.1f} us {row.note}",
                    flush=True,
                )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with open(args.out / "kernel_bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])) + ["device"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), "device": device_name})
    plot(rows, args.out, copy_tbps, device_name)
    print_summary(rows)
    if not args.no_prefill:
        shapes = quick_prefill_grid() if args.quick else prefill_grid()
        print_prefill_summary(run_prefill(shapes, device, dtype, timer, args.out, device_name))


def print_summary(rows: list[Row]) -> None:
    """One line per shape: each method's latency, and paged relative to the others."""
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault((r.batch, r.context, r.lengths, r.block_size), {})[r.method] = r.latency_us
    print(
        f"{'batch':>5} {'ctx':>6} {'lengths':>8} {'bs':>4} | "
        + " ".join(f"{m:>11}" for m in METHODS)
        + " | paged/sdpa paged/contig"
    )
    for (batch, context, lengths, bs), lat in table.items():
        cells = " ".join(f"{lat.get(m, float('nan')):11.1f}" for m in METHODS)
        ratio_sdpa = lat["paged"] / lat["sdpa"]
        ratio_contig = lat["paged"] / lat["contiguous"]
        print(f"{batch:>5} {context:>6} {lengths:>8} {bs:>4} | {cells} | {ratio_sdpa:10.2f} {ratio_contig:13.2f}")
    print("as called (host included), paged throughput / SDPA's, and host time of one paged call:")
    called: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        called.setdefault((r.batch, r.context, r.lengths, r.block_size), {})[r.method] = r
    for (batch, context, lengths, bs), by_method in called.items():
        paged, sdpa = by_method["paged"], by_method["sdpa"]
        print(f"{batch:>5} {context:>6} {lengths:>8} {bs:>4} | paged {paged.called_us:9.1f} us, sdpa"
              f" {sdpa.called_us:9.1f} us: {sdpa.called_us / paged.called_us:6.0%} | host {paged.host_us:6.1f} us"
              f" (python {paged.host_python_us:5.1f} us)")  # fmt: skip


def print_prefill_summary(rows: list[PrefillRow]) -> None:
    """Paged prefill's throughput as a share of SDPA's on the same tokens (the bar: >= 80%)."""
    by_shape: dict[tuple, dict[str, PrefillRow]] = {}
    for r in rows:
        by_shape.setdefault((r.seqs, r.new, r.prefix, r.lengths), {})[r.method] = r
    header = f"{'seqs':>4} {'new':>5} {'prefix':>6} {'lengths':>8}"
    print(f"{header} | paged TFLOP/s | sdpa TFLOP/s | paged/sdpa | as called")
    for (seqs, new, prefix, lengths), pair in by_shape.items():
        paged, sdpa = pair["paged"], pair["sdpa"]
        print(f"{seqs:>4} {new:>5} {prefix:>6} {lengths:>8} | {paged.tflops:13.1f} | {sdpa.tflops:12.1f} |"
              f" {paged.tflops / sdpa.tflops:10.0%} | {sdpa.called_us / paged.called_us:9.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
