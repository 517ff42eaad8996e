"""What every ``stvnet bench`` section shares: the sizes of a run, a median timer, a training step, the CPU
experiments' V-Net width, peak memory, and collecting a result from worker processes."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class BenchConfig:
    """Sizes of one benchmark run (``tiny`` keeps it to seconds for the test suite)."""

    step_sizes: tuple[int, ...] = (64, 96)
    metric_shapes: tuple[tuple[int, int, int], ...] = ((64, 64, 64), (128, 128, 128), (256, 256, 128), (512, 512, 200))
    repeats: int = 3
    full_width: bool = True
    roi: int = 64
    scan_shape: tuple[int, int, int] = (160, 96, 96)
    loader_batches: int = 12
    device: str = "cpu"
    ddp_steps: int = 8
    gpu_roi: int | None = None  # None: the gpu configs' own ROI
    gpu_batch: int | None = None  # None: the gpu configs' own batch size
    gpu_precision: str | None = None  # None: the gpu configs' own (bf16-mixed); "32-true" on a CPU without native bf16
    ceiling_scans: int = 6
    ceiling_configs: tuple[str, ...] = ()  # () : every experiment under experiments/ (gpu/ and peers/ included)

    @classmethod
    def tiny(cls) -> "BenchConfig":
        return cls(step_sizes=(32,), metric_shapes=((24, 24, 24),), repeats=1, full_width=False, roi=32,
                   scan_shape=(48, 40, 40), loader_batches=2, ddp_steps=2, gpu_roi=24, gpu_batch=1,
                   gpu_precision="32-true", ceiling_scans=1)


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(x)
        logits = out["logits"] if isinstance(out, dict) else out
        loss = torch.sigmoid(logits).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cpu_width(cfg: BenchConfig) -> dict:
    """V-Net arguments of the CPU experiment configs (narrower still in tiny runs)."""
    if cfg.full_width:
        return dict(base_channels=8, depth=3, convs_per_stage=(2, 2, 2), kernel_size=3)
    return dict(base_channels=4, depth=2, kernel_size=3)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def await_result(procs: list[mp.process.BaseProcess], queue: mp.Queue, timeout: float) -> object:
    """The first result a child process puts on ``queue``, or one line if they all exit without one (a crashed
    child must not leave the bench waiting for ``timeout``); children still alive after it are given a minute to
    leave and then terminated."""
    deadline = time.monotonic() + timeout
    result = None
    while result is None:
        try:
            result = queue.get(timeout=2.0)
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs) or time.monotonic() > deadline:
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"benchmark child processes ended without a result (exit codes {codes})") from None
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():  # its result is in: a rank stuck in gloo's teardown must not hold the bench
            proc.terminate()
    return result
