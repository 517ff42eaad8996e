"""The benchmark runs end to end at a tiny size, so it cannot rot."""

from __future__ import annotations

from stvnet.bench import BenchConfig, run_bench


def test_tiny_bench_produces_a_table_with_ratios(tiny_cohort, tmp_path):
    out = tmp_path / "bench.md"
    table = run_bench(BenchConfig.tiny(), out=out, manifest=str(tiny_cohort))
    assert out.read_text() == table
    lines = [line for line in table.splitlines() if line.startswith("| ") and "benchmark" not in line]
    names = " ".join(lines)
    for what in ("V-Net train step", "ST-V-Net vs V-Net", "inference one ROI", "sliding window", "metric set",
                 "loader vs model", "peak RSS train", "peak RSS inference"):
        assert what in names
    # every comparison has a finite positive ratio
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[4] != "-":
            assert float(cells[4].rstrip("x")) > 0
