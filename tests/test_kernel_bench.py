"""The kernel benchmark's command runs end to end (tiny shapes; on CPU through the interpreter)."""

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
