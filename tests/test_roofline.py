"""The decode-step arithmetic and measurement behind notebook 1 (minipaged/experiments/roofline.py)."""

import math

import torch
from transformers import LlamaConfig, OPTConfig

from minipaged.experiments import roofline
from minipaged.model import random_model

TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def test_opt_13b_takes_the_papers_800_kib_per_token():
    opt = OPTConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40)
    assert roofline.kv_shape(opt) == {"num_layers": 40, "num_kv_heads": 40, "head_dim": 128}
    assert roofline.kv_bytes_per_token(**roofline.kv_shape(opt)) == 800 * 2**10


def test_grouped_query_attention_divides_the_cache():
    llama_3_8b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert roofline.kv_bytes_per_token(**roofline.kv_shape(llama_3_8b)) == 128 * 2**10
    assert roofline.kv_bytes_per_token(1, 1, 1, bytes_per_value=4) == 8


def test_measured_step_counts_weights_kv_and_flops():
    model, _ = random_model(TINY, device="cpu", dtype=torch.float32)
    calls = []

    def timer(fn):
        calls.append(fn())
        return 0.5

    step = roofline.measure_decode_step(model, batch=3, context=10, timer=timer, block_size=4)
    logits = calls[0]
    assert logits.shape == (3, TINY.vocab_size) and torch.isfinite(logits).all()
    params = sum(p.numel() for p in model.parameters())
    assert step.weight_bytes == 4 * params
    assert step.kv_bytes == 3 * 11 * roofline.kv_bytes_per_token(2, 2, 8, 4)
    assert step.flops == 3 * (2 * params + 4 * 2 * 4 * 8 * 11)
    assert step.bandwidth_tbs == step.bytes / 0.5 / 1e12
    assert step.flops_per_byte == step.flops / step.bytes
    assert step.roofline_seconds(bandwidth_tbs=1e-12, tflops=1e12) == step.bytes
    assert step.roofline_seconds(bandwidth_tbs=1e12, tflops=1e-12) == step.flops


def test_matmul_rate_and_plot():
    two_seconds = lambda fn: (fn(), 2.0)[1]  # noqa: E731
    assert roofline.matmul_tflops(torch.device("cpu"), torch.float32, two_seconds, n=4) == 2 * 4**3 / 2 / 1e12
    steps = [roofline.DecodeStep(b, 16, 1e-3 * b, 1000, 10 * b, 100 * b) for b in (1, 2, 4)]
    fig = roofline.plot(steps, bandwidth_tbs=1e-6, tflops=1e-6, title="t")
    left, right = fig.axes
    assert [line.get_ydata()[0] for line in left.lines] == [1.0, 1010 / 1e6 * 1e3, 100 / 1e6 * 1e3]
    assert math.isclose(right.lines[0].get_ydata()[0], 100 * steps[0].bandwidth_tbs / 1e-6)
