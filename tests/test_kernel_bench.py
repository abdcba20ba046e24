"""The kernel benchmark's command runs end to end, decode and prefill (tiny shapes; on CPU through the interpreter)."""

import csv
import subprocess
import sys


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
    for row in prefill:  # paged prefill computes what SDPA computes on the same tokens, prefix or not
        assert row["note"] == "" and float(row["rel_err"]) < 2e-2 and float(row["tflops"]) > 0
    assert (tmp_path / "kernel_prefill.png").stat().st_size > 0
