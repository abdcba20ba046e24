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
