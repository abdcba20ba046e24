"""The sharing experiment (minipaged/experiments/sharing.py) on a tiny random model: every table
and figure it makes, with numbers that follow from the lengths."""

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig

from minipaged.experiments import sharing
from minipaged.model import random_model

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=512,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    return random_model(LlamaConfig(**TINY), seed=1, device="cpu", dtype=torch.float32)[1]


@pytest.fixture(autouse=True)
def reference_kernels_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_savings_grow_with_width_and_beams_share_more_than_samples(model):
    rows = sharing.savings_rows(model, datasets=("alpaca",), num_requests=3, max_len=64, widths=(2, 4))
    saved = {(r["kind"], r["width"]): r["saving_percent"] for r in rows}
    assert 0 < saved["parallel", 2] < saved["parallel", 4]  # the prompt is shared by more samples
    assert saved["parallel", 4] < saved["beam", 4]  # beams share their common outputs as well
    assert all(r["preemptions"] == 0 for r in rows)
    assert [r["paper_percent"] for r in rows] == [6.09, 8.53, 37.56, 53.13]
    sharing.savings_figure(rows)


def test_prefix_caching_computes_the_shared_prefix_once(model):
    rows = sharing.prefix_rows(model, num_requests=3, max_len=512, kv_slots=2048)
    by = {(r["shots"], r["system"], r["prefix_caching"]): r for r in rows}
    for shots, prefix_len in (("1-shot", 80), ("5-shot", 341)):
        plain, cached = by[shots, "paged", False], by[shots, "paged", True]
        assert plain["prompt_tokens_computed"] == plain["prompt_tokens"]
        # The prefix's full blocks were cached by the warm-up: no request computes them again.
        full_blocks = prefix_len // 16 * 16
        assert cached["prompt_tokens_computed"] == plain["prompt_tokens"] - 3 * full_blocks
    speed, work = sharing.prefix_figure(rows).axes
    # The paper's gains over Orca (Oracle) stand beside ours, as stars on our Oracle's throughput.
    (stars,) = [line for line in speed.get_lines() if line.get_label().startswith("paper")]
    oracle = [by[shots, "contiguous-oracle", False]["requests_per_s"] for shots in ("1-shot", "5-shot")]
    assert list(stars.get_ydata()) == pytest.approx([oracle[0] * 1.67, oracle[1] * 3.58])
    assert speed.get_xlabel() == work.get_xlabel() == "shared prefix"


def test_the_beam_block_tables_still_and_gif(model, tmp_path):
    snaps = sharing.beam_block_tables(model, tmp_path, beam_width=3, max_tokens=6)
    assert (tmp_path / "beam_block_tables.png").stat().st_size > 0
    assert Image.open(tmp_path / "beam_block_tables.gif").n_frames == len(snaps)
