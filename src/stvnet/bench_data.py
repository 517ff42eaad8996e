"""``stvnet bench --sections data``: the data pipeline at study scale, measured on cohorts of several sizes.

For the first ``n`` scans of a manifest (each size of ``--data-sizes``), with the data settings of an experiment
(``--data-config``, e.g. the GPU configuration's 1 mm spacing and 144³ ROI): the cold cache build serially and on all
cores, the warm start of a training process to its first batch (manifest headers, splits, template, locating every
subject from the cache), the peak resident memory of that process and of its loader workers, and the loader's
throughput against one training step of the experiment's V-Net on this machine. Each figure is extrapolated to the
paper's 397 scans and a node of 4 ranks: one cache build serves all ranks; each rank starts, holds and loads its own.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from data_modules.errors import InvalidInput
from data_modules.cache import single_threaded
from stvnet.bench_tools import BenchConfig, await_result, cpu_width, peak_rss_mib, timeit, train_step_fn
from stvnet.models import VNet
from stvnet.config import resolved_config

PAPER_SCANS = 397
RANKS = 4
#: the serial build (the reference of the parallel one) is timed on this many scans: a scan's build does not depend
#: on the others, so its per-scan time holds for any cohort size, and a 100-scan bench does not spend an hour on it
SERIAL_SAMPLE = 10


def data_section(config: str | Path | None) -> dict:
    """The ``data`` section of an experiment config (``None``: the datamodule's defaults)."""
    if config is None:
        return {}
    data = dict(resolved_config(config)["data"])
    data.pop("manifest", None)
    return data


def vnet_width(config: str | Path | None, cfg: BenchConfig) -> dict:
    """The V-Net arguments of an experiment config (its ST-V-Net's V-Net), else the CPU benchmark's."""
    if config is None or not cfg.full_width:
        return cpu_width(cfg)
    net = resolved_config(config)["model"]["net"]["init_args"]
    args = net["backbone"]["init_args"] if "backbone" in net else net
    return {k: v for k, v in args.items() if k in ("base_channels", "depth", "convs_per_stage", "kernel_size")}


def child_pids() -> set[int]:
    """Process ids of this process's children (from ``/proc``)."""
    return {int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()}


def record_peak_rss(pids: set[int], peaks: dict[int, float]) -> None:
    """Update ``peaks`` (pid -> MiB) with the peak resident memory of each of ``pids`` still alive (loader workers
    come and go with each epoch, so they are sampled while the loader runs)."""
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # the process has exited
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = max(peaks.get(pid, 0.0), int(line.split()[1]) / 1024.0)


def _epochs(dm) -> Iterator[dict]:
    """Training batches, epoch after epoch (a small cohort has few batches per epoch)."""
    while True:
        yield from dm.train_dataloader()


def _warm_start(kwargs: dict, batches: int, queue: mp.Queue) -> None:
    """In a fresh process: datamodule to the first training batch (timed), then ``batches`` more (throughput),
    sampling the loader workers' peak memory; reports (seconds, samples/s, own peak MiB, worker peaks, workers at once,
    batch, ROI)."""
    from data_modules.datamodule import FemurDataModule

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    before = child_pids()
    t0 = time.perf_counter()
    dm = FemurDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    stream = _epochs(dm)
    next(stream)
    warm = time.perf_counter() - t0
    peaks: dict[int, float] = {}
    record_peak_rss(child_pids() - before, peaks)
    t0, samples = time.perf_counter(), 0
    for _, batch in zip(range(batches), stream):
        samples += batch["image"]["data"].shape[0]
        record_peak_rss(child_pids() - before, peaks)
    rate = samples / (time.perf_counter() - t0)
    stream.close()
    del stream
    gc.collect()  # the loader (and a patch queue's own loader) shut their workers down now, not at interpreter exit
    queue.put((warm, rate, peak_rss_mib(), list(peaks.values()), max(1, dm.loader_workers), dm.batch_size,
               tuple(dm.hparams.roi_size)))


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """Torch and ITK on one thread each inside the block (as each cache-build worker runs), restored after it."""
    threads, itk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    single_threaded()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk)


def _sub_manifest(table: pd.DataFrame, n: int, folder: Path) -> Path:
    path = folder / f"manifest_{n}.csv"
    table.head(n)[["subject_id", "image", "label", "sex"]].to_csv(path, index=False)
    return path


def bench_data(cfg: BenchConfig, manifest: str | None, sizes: tuple[int, ...] = (),
               config: str | Path | None = None) -> list[dict]:
    """Rows of the data benchmark for each cohort size (default: the whole manifest)."""
    from data_modules.synthetic import default_manifest
    from data_modules.manifest import validate_manifest

    table = validate_manifest(manifest or str(default_manifest()), voxels=False)
    data, width = data_section(config), vnet_width(config, cfg)  # each resolves the experiment once
    measures = []
    for n in sizes or (len(table),):
        if n > len(table):
            raise InvalidInput(f"--data-sizes {n}: the manifest has {len(table)} scans")
        work = Path(tempfile.mkdtemp(prefix="stvnet-bench-data-"))
        try:
            measures.append(_bench_cohort(cfg, _sub_manifest(table, n, work), n, data, width, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return [row for m in measures for row in m.rows()] + fitted_rows(measures)


def fitted_rows(measures: list[CohortMeasures]) -> list[dict]:
    """With two or more cohort sizes: each start-up figure fitted as a + b·n (least squares over the sizes) and
    evaluated at 397 scans, which separates what grows with the cohort (b per scan) from the fixed start (a)."""
    if len({m.n for m in measures}) < 2:
        return []
    n = np.array([m.n for m in measures], float)
    rows = []
    for what, unit, values in (("first start of a fold", "s", [m.first for m in measures]),
                               ("warm start", "s", [m.warm for m in measures]),
                               ("main-process peak RSS", "MiB", [m.main for m in measures])):
        b, a = np.polyfit(n, np.array(values, float), 1)
        rows.append({"what": f"{what}, fitted {a:.3g} + {b:.3g}/scan over {', '.join(str(int(v)) for v in n)} scans: "
                             f"at 397 scans", "ours": a + b * PAPER_SCANS, "reference": float("nan"), "unit": unit,
                     "ratio": float("nan"), "reference_name": "-"})
    return rows


def _bench_cohort(cfg: BenchConfig, manifest: Path, n: int, data: dict, width: dict, work: Path) -> CohortMeasures:
    from data_modules.cache import CacheSettings, PreprocessedCache
    from data_modules.datamodule import FemurDataModule
    from data_modules.scan_io import read_header

    kwargs: dict = {**data, "manifest": str(manifest), "splits_dir": str(work / "splits"),
              "n_folds": min(int(data.get("n_folds", 10)), max(2, n // 4))}
    if not cfg.full_width:
        kwargs.update(roi_size=(cfg.roi,) * 3, target_spacing=(4.0, 4.0, 4.0), num_workers=1)
    probe = FemurDataModule(**kwargs)
    probe.subject_ids("train")  # reads the manifest (headers) and writes the splits
    h, table = probe.hparams, probe.table
    settings = CacheSettings(tuple(float(s) for s in h.target_spacing), tuple(float(v) for v in h.hu_window))
    scans = list(zip(table["subject_id"], table["image"], table["label"]))
    cores = os.cpu_count() or 1
    sample = scans[:SERIAL_SAMPLE]
    with one_core():  # the reference: one core's time (torch and ITK would otherwise thread over all of them)
        t0 = time.perf_counter()
        PreprocessedCache(work / "serial", settings).build(sample, workers=1)
        serial_sample = time.perf_counter() - t0
    # each scan is built on its own, in time proportional to its voxels (clinical scans have 150-300 slices):
    # the serial time of all n is the sample's seconds per voxel times their voxels
    voxels = [float(np.prod(read_header(image).shape[:3])) for _, image, _ in scans]
    serial = serial_sample * sum(voxels) / sum(voxels[:len(sample)])
    t0 = time.perf_counter()
    PreprocessedCache(work / "parallel", settings).build(scans, workers=cores)
    parallel = time.perf_counter() - t0

    # training processes' starts, each in a fresh process (peak memory is per process lifetime: this one built
    # caches): the fold's first start locates every subject and stores the locations; the next one (another rank,
    # trial or run of the fold) is the warm start
    ctx = mp.get_context("spawn")
    starts = []
    for _ in range(2):
        queue = ctx.Queue()
        child = ctx.Process(target=_warm_start, args=({**kwargs, "cache_dir": str(work / "parallel")},
                                                      cfg.loader_batches, queue))
        child.start()
        starts.append(await_result([child], queue, timeout=3600))
    first = starts[0][0]
    warm, loader_rate, main, workers, at_once, batch_size, roi = starts[1]
    x = torch.randn(batch_size, 1, *roi)
    step = timeit(train_step_fn(VNet(**width), x), repeats=1)
    return CohortMeasures(n, cores, serial, parallel, first, warm, main, workers, at_once, loader_rate,
                          batch_size / step, batch_size, tuple(roi))


@dataclass
class CohortMeasures:
    """What the data bench measured for one cohort size (times in s, memory in MiB, rates in samples/s)."""

    n: int
    cores: int
    serial: float  # cache build with one worker (timed on SERIAL_SAMPLE scans, per-voxel time x all voxels)
    parallel: float  # cache build with every core
    first: float  # the fold's first training process: start to first batch, cache built, subjects located
    warm: float  # the next process of the fold (locations stored): start to first batch
    main: float  # its main process's peak RSS
    workers: list[float]  # its loader workers' peak RSS (each epoch starts its own set: more than run at once)
    workers_at_once: int  # the loader's worker processes (num_workers capped at the cores)
    loader_rate: float
    model_rate: float  # the V-Net's training step on this machine
    batch_size: int
    roi: tuple

    def rows(self) -> list[dict]:
        """The bench table's rows, each extrapolated to the paper's 397 scans and RANKS ranks."""
        n, cores, serial, parallel, first, warm, main, workers = (
            self.n, self.cores, self.serial, self.parallel, self.first, self.warm, self.main, self.workers)
        scale, size = PAPER_SCANS / n, f"{n} scans"
        worker_rss = max(workers) if workers else float("nan")
        return [
            {"what": f"cache build, {size}, {cores} workers (397 scans: {parallel * scale / 60:.1f} min, once for all "
                     f"ranks)", "ours": parallel / n, "reference": serial / n / cores, "unit": "s/scan",
             "ratio": serial / cores / parallel, "reference_name": f"serial on one core {serial / n:.2f} s/scan (timed on the first {min(n, SERIAL_SAMPLE)} scans, "
                                       f"scaled by voxels) / cores (ideal)"},
            {"what": f"first start of a fold to first batch (locates every subject), {size} (397 scans: "
                     f"~{first * scale:.0f} s, once per fold)", "ours": first, "reference": float("nan"), "unit": "s",
             "ratio": float("nan"), "reference_name": "-"},
            {"what": f"warm start to first batch, {size} (397 scans: ~{warm * scale:.0f} s per rank)", "ours": warm,
             "reference": 30.0 / scale, "unit": "s", "ratio": 30.0 / scale / warm,
             "reference_name": "30 s target for 397 scans, scaled"},
            {"what": f"main-process peak RSS, {size} (x{RANKS} ranks: {RANKS * main / 1024:.1f} GiB)", "ours": main,
             "reference": float("nan"), "unit": "MiB", "ratio": float("nan"), "reference_name": "-"},
            {"what": f"loader worker peak RSS, {size} ({self.workers_at_once} workers at once; x{RANKS} ranks: "
                     f"{RANKS * self.workers_at_once * worker_rss / 1024:.1f} GiB)", "ours": worker_rss,
             "reference": float("nan"), "unit": "MiB", "ratio": float("nan"), "reference_name": "-"},
            {"what": f"loader vs V-Net train step {self.roi} x {self.batch_size}, {size}",
             "ours": self.loader_rate, "reference": self.model_rate, "unit": "samples/s",
             "ratio": self.loader_rate / self.model_rate, "reference_name": "model consumption on this machine"},
        ]

