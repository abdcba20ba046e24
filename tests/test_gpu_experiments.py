"""The GPU experiments (throughput, preemption) on a machine without one: they say so with a usage
error instead of failing half-way, throughput's figure is redrawn from committed CSVs, and preemption runs
small on a CPU (what a notebook does in small mode)."""

import csv

import pytest
import torch

from minipaged.experiments import preemption, throughput


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gets")
@pytest.mark.parametrize("main", [throughput.main, preemption.main])
def test_without_a_gpu_the_experiments_stop_with_a_usage_error(main, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path)])
    assert stop.value.code == 2 and "CUDA GPU" in capsys.readouterr().err


def test_bad_throughput_options_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        throughput.main(["--out", str(tmp_path), "--kv-slots", "100"])
    assert stop.value.code == 2 and "--kv-slots" in capsys.readouterr().err


def test_throughput_redraws_merged_csvs(tmp_path):
    rows = [
        dict(gpu="H", model="a", workload="w", system="minipaged paged", budget="large", tokens_per_s="900"),
        dict(gpu="H", model="a", workload="w", system="transformers generate_batch", budget="large",
             tokens_per_s="30"),
    ]
    paths = []
    for i, row in enumerate(rows):
        paths.append(tmp_path / f"part{i}.csv")
        with paths[-1].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    throughput.main(["--out", str(tmp_path / "out"), "--replot", *map(str, paths)])
    merged = list(csv.DictReader((tmp_path / "out" / "throughput.csv").open()))
    assert [r["system"] for r in merged] == ["minipaged paged", "transformers generate_batch"]
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 0


def test_preemption_runs_on_a_cpu_with_a_small_model():
    rows = preemption.run(32, reps=1, device="cpu", shape=preemption.SMALL_SHAPE, block_sizes=(1, 16))
    assert [row["block_size"] for row in rows] == [1, 16]
    assert all(row[key] > 0 for row in rows for key in ("recompute_ms", "swap_one_transfer_ms", "swap_per_block_ms"))
    fig = preemption.figure(rows, "CPU")
    assert fig.axes[0].get_xlabel() == "block size (tokens)"


@pytest.mark.parametrize("min_seconds, passes", [(0.0, 1), (1e9, throughput.MAX_PASSES)])
def test_a_throughput_cell_reports_the_median_of_an_odd_number_of_passes(monkeypatch, min_seconds, passes):
    """On a CPU, with the GPU's synchronisation stubbed: a cell measured long enough after one pass
    runs one; one never measured long enough runs the most passes; the reported pass is the median."""
    from transformers import LlamaConfig

    from minipaged.model import random_model

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(throughput, "MIN_SECONDS", min_seconds)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    hf_model = random_model(config, device="cpu", dtype=torch.float32)[1]
    work = throughput.Workload("tiny", [8] * 3, [4] * 3)
    row = throughput.run_minipaged(hf_model, "paged", work, 1024, max_num_seqs=4)
    assert row["passes"] == passes and passes % 2 == 1
    assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
    assert row["tokens_per_s"] == pytest.approx(12 / row["seconds"])  # 3 requests x 4 tokens, of the median pass
