"""The benchmark runs end to end at a tiny size, so it cannot rot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stvnet.bench import bench_gpu_memory, run_bench, training_memory
from stvnet.bench_tools import BenchConfig


@pytest.mark.heavy
def test_tiny_bench_produces_a_table_with_ratios(tiny_cohort, tmp_path):
    out = tmp_path / "bench.md"
    table = run_bench(BenchConfig.tiny(), out=out, manifest=str(tiny_cohort), data_sizes=(8, 14))
    assert out.read_text() == table
    lines = [line for line in table.splitlines() if line.startswith("| ") and "benchmark" not in line]
    names = " ".join(lines)
    for what in ("V-Net train step", "ST-V-Net vs V-Net", "inference one ROI", "sliding window", "metric set",
                 "loader vs model", "cache build, 8 scans", "cache build, 14 scans", "warm start to first batch, 14",
                 "loader worker peak RSS, 14 scans (1 workers at once", "loader vs V-Net train step", "peak RSS train",
                 "peak RSS inference", "DDP step, 2 gloo ranks", "first start of a fold to first batch",
                 "warm start, fitted"):
        assert what in names
    # every comparison has a finite positive ratio
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[4] != "-":
            assert float(cells[4].rstrip("x")) > 0


def test_training_memory_counts_what_autograd_keeps():
    """Known answer: a conv keeps its input for the weight gradient, a ReLU its output; Adam adds 3x the weights."""
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 1, 8, 8, 8)
    parts = training_memory(net, x, dtype=None)
    weights = sum(p.numel() * 4 for p in net.parameters())
    assert parts["weights"] == weights and parts["optimizer"] == 3 * weights
    assert parts["activations"] == x.numel() * 4 + 2 * 4 * 8 ** 3 * 4
    net[0].requires_grad_(False)  # frozen parts need no gradients or moments
    assert training_memory(net, x, dtype=None)["optimizer"] == 0


def test_gpu_config_memory_grows_with_the_roi():
    """One subject a batch at 24^3 and 28^3 (the ST-V-Net's STN needs 24^3), in float32: in bf16 a CPU without native
    bf16 emulates the GPU networks ~17x slower (24^3 and 32^3 at the configs' batch took 18 min on an AVX2 machine)."""
    small, large = (bench_gpu_memory(BenchConfig(gpu_roi=roi, gpu_batch=1, gpu_precision="32-true")) for roi in (24, 28))
    for a, b in zip(small, large):
        assert "GPU memory gpu/" in a["what"] and "batch 1 x 24^3, 32-true" in a["what"] and b["ours"] > a["ours"] > 0


def test_a_child_that_dies_without_a_result_fails_the_bench_at_once():
    """A benchmark child that crashes (here: exits with status 3 before reporting) is one error naming its exit
    code within seconds, not a wait for the section's whole timeout."""
    import multiprocessing as mp
    import sys
    import time

    from stvnet.bench_tools import await_result

    ctx = mp.get_context("spawn")
    child = ctx.Process(target=sys.exit, args=(3,))
    child.start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ended without a result \(exit codes \[3\]\)"):
        await_result([child], ctx.Queue(), timeout=600)
    assert time.monotonic() - t0 < 60


def test_start_up_figures_are_fitted_over_the_cohort_sizes_and_read_at_397_scans():
    """a + b·n through the measured sizes, evaluated at the paper's 397 scans: the fixed start and the part that
    grows with the cohort, not one size's figure scaled by 397 / n."""
    from stvnet.bench_data import CohortMeasures, fitted_rows

    def measured(n: int) -> CohortMeasures:
        return CohortMeasures(n, 2, 1.0, 1.0, first=5.0 + 0.5 * n, warm=12.0 + 0.01 * n, main=600.0, workers=[900.0],
                              workers_at_once=1, loader_rate=1.0, model_rate=1.0, batch_size=2, roi=(8, 8, 8))

    assert fitted_rows([measured(10)]) == []  # one size fits nothing
    rows = {r["what"].split(",")[0]: r for r in fitted_rows([measured(10), measured(40), measured(100)])}
    assert rows["first start of a fold"]["ours"] == pytest.approx(5.0 + 0.5 * 397)
    assert rows["warm start"]["ours"] == pytest.approx(12.0 + 0.01 * 397)
    assert rows["main-process peak RSS"]["ours"] == pytest.approx(600.0)
    assert "over 10, 40, 100 scans" in rows["warm start"]["what"]


def test_worker_memory_is_extrapolated_from_the_workers_that_run_at_once():
    """Each epoch of a short bench starts a new set of loader workers: 56 pids seen with num_workers=8 are 8
    processes at a time, so 4 ranks hold 4 x 8 of them, not 4 x 56."""
    from stvnet.bench_data import CohortMeasures

    measured = CohortMeasures(10, 2, 1.0, 1.0, first=5.0, warm=12.0, main=600.0, workers=[900.0] * 56,
                              workers_at_once=8, loader_rate=1.0, model_rate=1.0, batch_size=2, roi=(8, 8, 8))
    (row,) = [r for r in measured.rows() if r["what"].startswith("loader worker peak RSS")]
    assert row["ours"] == 900.0
    assert "(8 workers at once; x4 ranks: 28.1 GiB)" in row["what"]


def test_the_ceiling_section_scores_each_distinct_data_setting_once(tiny_cohort):
    """Experiments that share their data settings (the V-Net and ST-V-Net configs) share one ceiling row; another grid
    (the GPU configs' 144^3 at 1 mm) gets its own; each is a DSC a perfect network reaches, below 1 on a coarser grid."""
    from stvnet.bench import EXPERIMENTS, bench_ceiling

    cfg = BenchConfig.tiny()
    cfg.ceiling_configs = tuple(str(EXPERIMENTS / name) for name in ("vnet.yaml", "stvnet.yaml", "gpu/vnet.yaml"))
    rows = bench_ceiling(cfg, str(tiny_cohort))
    assert [r["what"].split(":")[0] for r in rows] == ["ceiling of vnet, stvnet", "ceiling of gpu/vnet"]
    assert "64x64x64 at 2.3x2.3x2.3 mm, linear labels (1 scans;" in rows[0]["what"]
    assert all(r["unit"] == "DSC" and 0.8 < r["ours"] <= 1.0 for r in rows)
