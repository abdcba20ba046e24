"""The kernel benchmark's command runs end to end, decode and prefill (tiny shapes; on CPU through the interpreter)."""

import csv
import subprocess
import sys

import pytest

from minipaged.experiments import kernel_bench as kb
from tests.test_ops import DEVICE, needs_triton  # also sets TRITON_INTERPRET on a CPU


def test_kernel_bench_quick_writes_csv_and_figures(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "minipaged.experiments.kernel_bench", "--out", str(tmp_path), "--quick"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    with (tmp_path / "kernel_bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"paged", "contiguous", "sdpa"} <= {row["method"] for row in rows}
    for row in rows:
        if row["latency_us"]:
            assert float(row["latency_us"]) > 0 and float(row["rel_err"]) < 2e-2
    assert (tmp_path / "kernel_bandwidth.png").stat().st_size > 0
    assert (tmp_path / "kernel_block_size.png").stat().st_size > 0
    ours = [row for row in rows if row["method"] in ("paged", "contiguous")]
    assert all(float(row["host_python_us"]) > 0 and float(row["called_us"]) > 0 for row in ours)
    with (tmp_path / "kernel_prefill.csv").open() as f:
        prefill = list(csv.DictReader(f))
    assert {(row["method"], row["prefix"]) for row in prefill} >= {("paged", "0"), ("sdpa", "0"), ("paged", "8")}
    assert {(row["method"], row["lengths"]) for row in prefill} >= {("paged", "variable"), ("sdpa", "variable")}
    for row in prefill:  # paged prefill computes what SDPA computes on the same tokens: prefix, padding or not
        assert row["note"] == "" and float(row["rel_err"]) < 2e-2 and float(row["tflops"]) > 0
    assert (tmp_path / "kernel_prefill.png").stat().st_size > 0


@needs_triton
def test_prefill_tune_times_each_config_and_checks_it_against_sdpa(tmp_path):
    """The sweep that chose the prefill launch shape: one row per config, each one checked."""
    shapes = [kb.PrefillShape(2, 20, 0, 8, "variable")]
    kb.tune_prefill(DEVICE, kb.make_timer(DEVICE), tmp_path, shapes, configs=[(64, 32, 4, 2), (16, 16, 4, 1)])
    with (tmp_path / "kernel_tune_prefill.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["BLOCK_M"], row["TILE"]) for row in rows] == [("64", "32"), ("16", "16")]
    assert all(float(row["rel_err"]) < 2e-2 and float(row["latency_us"]) > 0 for row in rows)


def test_variable_prefill_is_benched_without_a_prefix():
    with pytest.raises(ValueError, match="without a prefix"):
        kb.PrefillShape(2, 20, 8, lengths="variable")
