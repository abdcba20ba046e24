"""Why decoding is memory-bound: the bytes and FLOPs of one decode step against the hardware (paper §2.3, §3).

A decode step gives each of ``B`` sequences one new token. To do it the GPU must

* read every weight of the model once (the batch shares them): ``weight_bytes``;
* read the key and value of every token already cached, in every layer: ``B x context x
  kv_bytes_per_token`` (the paper's §3 example: 800 KB per token for OPT-13B);
* compute about 2 FLOPs per weight per sequence (a multiply and an add), plus attention's few.

So the FLOPs grow with ``B`` while the weight bytes do not: at small batches a step does a few
FLOPs per byte, far below the hundreds a GPU can do per byte it reads, and its time is set by
memory bandwidth. That is why the paper's §3 says serving throughput is bound by how many
requests fit in memory at once, and why PagedAttention fights for KV memory.

``measure_decode_step`` times one real decode step of a ``minipaged.model.Llama`` through a
paged KV cache and returns what it moved; ``plot`` draws the steps against the roofline, the
larger of bytes / bandwidth and FLOPs / matmul rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from minipaged.kv import PagedKVCache
from minipaged.model import Llama

Timer = Callable[[Callable[[], object]], float]  # seconds of one call (see kernel_bench.make_timer)


def kv_shape(hf_config: Any) -> dict[str, int]:
    """Layers, KV heads and head dimension of any transformers decoder config (Llama, OPT, ...):
    a model without ``num_key_value_heads`` keeps one KV head per query head (multi-head attention)."""
    heads = hf_config.num_attention_heads
    return {
        "num_layers": hf_config.num_hidden_layers,
        "num_kv_heads": getattr(hf_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
    }


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Bytes of KV cache one token takes: a key and a value, per layer, per KV head (fp16: 2 bytes a value)."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value


@dataclass(frozen=True)
class DecodeStep:
    """One measured decode step of ``batch`` sequences that each hold ``context`` tokens."""

    batch: int
    context: int
    seconds: float
    weight_bytes: int
    kv_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def bandwidth_tbs(self) -> float:
        """Bytes the step must read over its time, in TB/s."""
        return self.bytes / self.seconds / 1e12

    @property
    def flops_per_byte(self) -> float:
        return self.flops / self.bytes

    def roofline_seconds(self, bandwidth_tbs: float, tflops: float) -> float:
        """The least time the hardware allows: moving the bytes, or doing the FLOPs, whichever is slower."""
        return max(self.bytes / (bandwidth_tbs * 1e12), self.flops / (tflops * 1e12))


def decode_flops(num_params: int, config: Any, batch: int, context: int) -> int:
    """2 FLOPs per weight per sequence, plus attention's QK^T and PV over ``context`` tokens per layer."""
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * context
    return batch * (2 * num_params + attention)


def measure_decode_step(model: Llama, batch: int, context: int, timer: Timer, block_size: int = 16) -> DecodeStep:
    """Time one decode step of ``batch`` sequences of ``context`` cached tokens each.

    The cached K/V are zeros: a step reads them all the same, and timing needs no real prompt.
    The step is what the engine runs: the forward pass (each layer writes the new K/V and attends
    through the block tables) and the output head's logits.
    """
    config = model.config
    weight = next(model.parameters())
    blocks_per_seq = math.ceil((context + 1) / block_size)
    cache = PagedKVCache(batch * blocks_per_seq, block_size, num_layers=config.num_layers,
                         num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=weight.dtype,
                         device=weight.device, max_seq_len=blocks_per_seq * block_size)
    seq_ids = list(range(batch))
    for seq_id in seq_ids:
        cache.allocate(seq_id, context)
        cache.append_slots(seq_id)  # the new token's slot
    metadata = cache.attention_metadata(seq_ids, [1] * batch)
    input_ids = torch.zeros(batch, dtype=torch.int64, device=weight.device)  # [B]
    positions = torch.full((batch,), context, dtype=torch.int64, device=weight.device)  # [B]
    seconds = timer(lambda: model.compute_logits(model(input_ids, positions, cache, metadata)))
    num_params = sum(p.numel() for p in model.parameters())  # a tied output head counts once
    per_token = kv_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim, weight.element_size())
    return DecodeStep(batch=batch, context=context, seconds=seconds,
                      weight_bytes=num_params * weight.element_size(), kv_bytes=batch * (context + 1) * per_token,
                      flops=decode_flops(num_params, config, batch, context + 1))


def matmul_tflops(device: torch.device, dtype: torch.dtype, timer: Timer, n: int = 8192) -> float:
    """The rate of one large square matmul, in TFLOP/s: what "compute-bound" can reach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timer(lambda: a @ a) / 1e12


def plot(steps: list[DecodeStep], bandwidth_tbs: float, tflops: float, title: str):
    """Two panels against the batch size: measured step time beside the two floors (memory, compute),
    and the bandwidth the step achieves as a share of the measured copy bandwidth."""
    from minipaged.experiments.plotting import plt

    batches = [s.batch for s in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(batches, [1e3 * s.seconds for s in steps], "o-", label="measured step")
    left.plot(batches, [1e3 * s.bytes / (bandwidth_tbs * 1e12) for s in steps], "--",
              label=f"memory floor: bytes / {bandwidth_tbs:.3g} TB/s")
    left.plot(batches, [1e3 * s.flops / (tflops * 1e12) for s in steps], ":",
              label=f"compute floor: FLOPs / {tflops:.3g} TFLOP/s")
    left.set(xscale="log", yscale="log", xlabel="sequences in the batch", ylabel="time per decode step (ms)",
             title="One decode step")
    left.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
    right.plot(batches, [100 * s.bandwidth_tbs / bandwidth_tbs for s in steps], "o-")
    for s in steps:
        right.annotate(f"{s.flops_per_byte:.1f} FLOP/B", (s.batch, 100 * s.bandwidth_tbs / bandwidth_tbs),
                       textcoords="offset points", xytext=(4, 4), fontsize=7)
    right.set(xscale="log", ylim=(0, 110), xlabel="sequences in the batch",
              ylabel="bytes read / time (% of copy bandwidth)", title="How close to the memory floor")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
