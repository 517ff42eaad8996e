"""``stvnet bench``: speed of the framework as ratios against the peers a user would pick instead.

Every figure is the median of several repeats after a warm-up, measured in the same process run as its
reference (MONAI), so ratios hold on a shared machine where absolute times drift. Sections:

* training step (forward + backward + AdamW) of our V-Net vs MONAI's ``VNet`` at Milletari's configuration,
  and ST-V-Net's step relative to V-Net's (the cost of the shape prior);
* inference on one ROI and on a whole scan by sliding window: TorchIO grid sampling vs MONAI's
  ``sliding_window_inference`` with the same model and overlap;
* metrics: our full per-case set vs MONAI's Dice + Hausdorff (HD, HD95) + surface distance, by volume size;
* data pipeline: training samples/s delivered by the datamodule vs the model's consumption rate;
* peak resident memory of training and of inference (each measured in a fresh subprocess);
* DDP: the per-step cost of ``find_unused_parameters=True`` (what staged runs need) against plain DDP, 2 gloo ranks;
* the ceiling of each experiment's ROI grid: the DSC, HD95 and ASSD a perfect network would reach through that
  config's preprocessing (:mod:`stvnet.ceiling`), on the cohort's first scans;
* GPU memory of the ``experiments/gpu`` configs, measured on any device: parameters, gradients and AdamW moments plus
  the activations autograd saves for the backward pass (bf16 autocast, the configs' batch and ROI).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from jsonargparse import ArgumentParser
from torch.nn.parallel import DistributedDataParallel

from stvnet.bench_tools import BenchConfig, await_result, cpu_width, peak_rss_mib, timeit, train_step_fn
from stvnet.bench_data import bench_data
from stvnet.metrics import evaluate_case
from stvnet.models import STVNet, VNet
from stvnet.config import resolved_config


def our_full_vnet() -> VNet:
    """Our V-Net in MONAI VNet's exact configuration (width 16, four levels, 5^3 kernels, same conv counts)."""
    return VNet(base_channels=16, depth=4, convs_per_stage=(1, 2, 3, 2), decoder_convs=(2, 2, 1, 1), kernel_size=5)


def bench_training(cfg: BenchConfig) -> list[dict]:
    from monai.networks.nets import VNet as MonaiVNet

    rows = []
    dev = torch.device(cfg.device)
    for size in cfg.step_sizes:
        x = torch.randn(1, 1, size, size, size, device=dev)
        if cfg.full_width:
            ours, theirs = our_full_vnet(), MonaiVNet(spatial_dims=3, in_channels=1, out_channels=1)
        else:
            ours, theirs = VNet(base_channels=4, depth=2, kernel_size=3), MonaiVNet(spatial_dims=3, in_channels=1, out_channels=1)
        t_ours = timeit(train_step_fn(ours.to(dev), x), cfg.repeats, device=cfg.device)
        t_monai = timeit(train_step_fn(theirs.to(dev), x), cfg.repeats, device=cfg.device)
        rows.append({"what": f"V-Net train step 1x1x{size}^3", "ours": 1 / t_ours, "reference": 1 / t_monai,
                     "unit": "volumes/s", "ratio": t_monai / t_ours, "reference_name": "MONAI VNet"})
    # what the shape prior costs: ST-V-Net vs its own V-Net at the CPU training configuration
    size = cfg.roi
    x = torch.randn(2, 1, size, size, size, device=dev)
    width = cpu_width(cfg)
    vnet = VNet(**width).to(dev)
    st = STVNet(VNet(**width)).to(dev)
    st.set_prior(torch.rand(1, size, size, size))
    t_v = timeit(train_step_fn(vnet, x), cfg.repeats, device=cfg.device)
    t_s = timeit(train_step_fn(st, x), cfg.repeats, device=cfg.device)
    rows.append({"what": f"ST-V-Net vs V-Net train step 2x1x{size}^3", "ours": 2 / t_s, "reference": 2 / t_v,
                 "unit": "volumes/s", "ratio": t_v / t_s, "reference_name": "our V-Net"})
    return rows


def bench_inference(cfg: BenchConfig) -> list[dict]:
    import torchio as tio
    from monai.inferers import sliding_window_inference

    dev = torch.device(cfg.device)
    width = cpu_width(cfg)
    model = VNet(**width).to(dev).eval()
    roi = torch.randn(1, 1, cfg.roi, cfg.roi, cfg.roi, device=dev)
    rows = []
    with torch.inference_mode():
        t_ours = timeit(lambda: torch.sigmoid(model(roi)), cfg.repeats, device=cfg.device)
        t_monai = timeit(lambda: sliding_window_inference(roi, (cfg.roi,) * 3, 1, lambda t: torch.sigmoid(model(t))),
                         cfg.repeats, device=cfg.device)
    rows.append({"what": f"inference one ROI {cfg.roi}^3", "ours": t_ours, "reference": t_monai, "unit": "s",
                 "ratio": t_monai / t_ours, "reference_name": "MONAI sliding_window_inference"})
    scan = torch.randn(1, *cfg.scan_shape)
    overlap = cfg.roi // 4
    patch = (cfg.roi,) * 3

    def ours_scan() -> torch.Tensor:
        subject = tio.Subject(image=tio.ScalarImage(tensor=scan))
        sampler = tio.GridSampler(subject, patch, patch_overlap=overlap)
        aggregator = tio.GridAggregator(sampler, overlap_mode="average")
        for batch in tio.SubjectsLoader(sampler, batch_size=4):
            with torch.inference_mode():
                aggregator.add_batch(torch.sigmoid(model(batch["image"][tio.DATA].to(dev))).cpu(), batch[tio.LOCATION])
        return aggregator.get_output_tensor()

    def monai_scan() -> torch.Tensor:
        with torch.inference_mode():
            return sliding_window_inference(scan[None].to(dev), patch, 4, lambda t: torch.sigmoid(model(t)),
                                            overlap=overlap / cfg.roi)

    t_ours = timeit(ours_scan, cfg.repeats, device=cfg.device)
    t_monai = timeit(monai_scan, cfg.repeats, device=cfg.device)
    rows.append({"what": f"sliding window scan {'x'.join(map(str, cfg.scan_shape))}", "ours": t_ours, "reference": t_monai,
                 "unit": "s", "ratio": t_monai / t_ours, "reference_name": "MONAI sliding_window_inference"})
    return rows


def _femur_like_pair(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A prediction/target pair the size of a femur in a CT of ``shape`` (prediction slightly shifted)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    c = [n * 0.4 for n in shape]
    r = [n * 0.12 for n in shape]
    target = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r)) <= 1.0
    shaft = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids[:2], [c[0] + r[0] * 0.3, c[1]], [r[0] * 0.4, r[1] * 0.4])) <= 1.0
    target = target | (shaft & (grids[2] < c[2]) & (grids[2] > c[2] * 0.2))
    pred = np.roll(target, 2, axis=0) | np.roll(target, 1, axis=2)
    return pred, target


def bench_metrics(cfg: BenchConfig) -> list[dict]:
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

    rows = []
    spacing = (0.7, 0.7, 2.5)
    for shape in cfg.metric_shapes:
        pred, target = _femur_like_pair(shape)

        def monai_set() -> None:
            p = torch.from_numpy(pred)[None, None]
            t = torch.from_numpy(target)[None, None]
            DiceMetric()(p, t)
            HausdorffDistanceMetric()(p, t, spacing=spacing)
            HausdorffDistanceMetric(percentile=95)(p, t, spacing=spacing)
            SurfaceDistanceMetric(symmetric=True)(p, t, spacing=spacing)

        repeats = cfg.repeats if np.prod(shape) < 2e7 else max(1, cfg.repeats - 1)
        t_ours = timeit(lambda: evaluate_case(pred, target, spacing), repeats)
        t_monai = timeit(monai_set, repeats)
        rows.append({"what": f"metric set {'x'.join(map(str, shape))}", "ours": t_ours, "reference": t_monai, "unit": "s",
                     "ratio": t_monai / t_ours, "reference_name": "MONAI Dice+HD+HD95+ASSD"})
    return rows


def bench_loader(cfg: BenchConfig, manifest: str | None) -> list[dict]:
    """Samples/s from the training loader (default workers, augmentation on) vs the model's consumption."""
    from data_modules.datamodule import FemurDataModule

    kwargs = dict(splits_dir=tempfile.mkdtemp(prefix="stvnet-bench-splits-"),
                  cache_dir=tempfile.mkdtemp(prefix="stvnet-bench-cache-"))
    if manifest:
        kwargs["manifest"] = manifest
    if not cfg.full_width:
        kwargs.update(roi_size=(cfg.roi,) * 3, target_spacing=(4.0, 4.0, 4.0), n_folds=2, num_workers=0)
    dm = FemurDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()  # the cache was built by prepare_data, before the clock starts
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()  # skip worker start-up
            continue
        n += batch["image"]["data"].shape[0]
        if i >= cfg.loader_batches:
            break
    loader_rate = n / (time.perf_counter() - t0) if n else float("nan")
    width = cpu_width(cfg)
    x = torch.randn(dm.batch_size, 1, *dm.hparams.roi_size)
    t_step = timeit(train_step_fn(VNet(**width), x), cfg.repeats)
    model_rate = dm.batch_size / t_step
    for folder in (kwargs["splits_dir"], kwargs["cache_dir"]):
        shutil.rmtree(folder, ignore_errors=True)
    return [{"what": f"loader vs model (batch {dm.batch_size}, {dm.num_workers} workers)", "ours": loader_rate,
             "reference": model_rate, "unit": "samples/s", "ratio": loader_rate / model_rate,
             "reference_name": "model consumption"}]


def _peak_rss_child(kind: str, cfg: BenchConfig, queue: mp.Queue) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    width = cpu_width(cfg)
    model = VNet(**width)
    x = torch.randn(2, 1, cfg.roi, cfg.roi, cfg.roi)
    if kind == "train":
        step = train_step_fn(model, x)
        for _ in range(2):
            step()
    else:
        with torch.inference_mode():
            model.eval()(x[:1])
    queue.put(peak_rss_mib())


def bench_memory(cfg: BenchConfig) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for kind in ("train", "inference"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_rss_child, args=(kind, cfg, queue))
        proc.start()
        peak = await_result([proc], queue, timeout=600)
        rows.append({"what": f"peak RSS {kind} (CPU config, {cfg.roi}^3)", "ours": peak, "reference": float("nan"),
                     "unit": "MiB", "ratio": float("nan"), "reference_name": "-"})
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cfg: BenchConfig, queue: mp.Queue) -> None:
    """One gloo rank: median step time of ST-V-Net under DDP with and without unused-parameter search."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(2, 1, cfg.roi, cfg.roi, cfg.roi)
    times = {}
    for label, find_unused, frozen in (("plain", False, ()), ("find_unused", True, ()),
                                       ("find_unused, stage 1 (STN and fusion frozen)", True, ("stn", "fusion"))):
        net = STVNet(VNet(**cpu_width(cfg)))
        net.set_prior(torch.rand(1, cfg.roi, cfg.roi, cfg.roi))
        for part in frozen:
            getattr(net, part).requires_grad_(False)
        model = DistributedDataParallel(net, find_unused_parameters=find_unused)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            out = model(x)
            loss = torch.sigmoid(out["backbone_logits" if frozen else "logits"]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        dist.barrier()
        times[label] = timeit(step, max(cfg.ddp_steps, 1))
    if rank == 0:
        queue.put(times)
    dist.barrier()  # both ranks leave together: a gloo rank whose peer has gone can hang in its teardown
    dist.destroy_process_group()


def bench_ddp(cfg: BenchConfig) -> list[dict]:
    """What ``find_unused_parameters=True`` costs per DDP step (2 gloo ranks, CPU configuration of ST-V-Net)."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, cfg, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    times = await_result(procs, queue, timeout=1200)
    plain = times.pop("plain")
    return [{"what": f"DDP step, 2 gloo ranks, ST-V-Net 2x1x{cfg.roi}^3, {label}", "ours": t, "reference": plain,
             "unit": "s", "ratio": plain / t, "reference_name": "DDP find_unused_parameters=False, all parts training"}
            for label, t in times.items()]


def build_network(spec: dict) -> torch.nn.Module:
    """The ``model.net`` of an experiment YAML (``class_path``/``init_args``, nested), built as LightningCLI would."""
    parser = ArgumentParser()
    parser.add_argument("--net", type=torch.nn.Module)
    return parser.instantiate(parser.parse_object({"net": spec})).net


def training_memory(net: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> dict[str, float]:
    """Bytes a training step keeps: parameters, gradients and AdamW's two moments of the trainable parameters (fp32),
    and the activations autograd saves in the forward pass for the backward (each storage counted once; parameters
    excluded). Transient buffers of the backward pass come on top."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = net(x)
    del out
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {"weights": sum(p.numel() * p.element_size() for p in net.parameters()), "optimizer": 3 * trainable,
            "activations": float(sum(saved.values()))}


def bench_gpu_memory(cfg: BenchConfig) -> list[dict]:
    """Memory per GPU of each ``experiments/gpu`` config at its batch size and ROI (``gpu_batch``, ``gpu_roi``
    and ``gpu_precision`` override them). The forward pass runs for real, in bf16 where the config trains in it (a CPU
    without native bf16 emulates it, ~17x slower than float32: ``gpu_precision="32-true"`` there)."""
    rows = []
    for path in sorted((EXPERIMENTS / "gpu").glob("*.yaml")):
        config = resolved_config(path)
        data = config["data"]
        roi = cfg.gpu_roi or int(data["roi_size"][0])
        net = build_network(config["model"]["net"])
        if isinstance(net, STVNet):
            net.set_prior(torch.rand(1, roi, roi, roi))
        precision = cfg.gpu_precision or str(config["trainer"].get("precision", ""))
        dtype = torch.bfloat16 if "bf16" in precision else None
        x = torch.randn(cfg.gpu_batch or int(data["batch_size"]), 1, roi, roi, roi)
        parts = training_memory(net, x, dtype)
        total = sum(parts.values()) / 2**30
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
        what = f"GPU memory {path.parent.name}/{path.name}: batch {x.shape[0]} x {roi}^3, {precision} ({detail} GiB)"
        rows.append({"what": what,
                     "ours": total, "reference": float("nan"), "unit": "GiB", "ratio": float("nan"),
                     "reference_name": "-"})
    return rows


EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def experiment_configs() -> list[Path]:
    """Every experiment config (``experiments/*.yaml`` and its ``gpu/`` and ``peers/`` folders; not the ``nets/``
    pieces they compose)."""
    return [p for pattern in ("*.yaml", "gpu/*.yaml", "peers/*.yaml") for p in sorted(EXPERIMENTS.glob(pattern))]


def bench_ceiling(cfg: BenchConfig, manifest: str | None) -> list[dict]:
    """The ceiling of each experiment's ROI grid (once per distinct data setting) on the cohort's first
    ``ceiling_scans`` scans, with the ROI centred on each label (:func:`~stvnet.ceiling.grid_ceiling`)."""
    from data_modules.synthetic import default_manifest
    from data_modules.manifest import validate_manifest
    from stvnet.ceiling import grid_ceiling

    table = validate_manifest(manifest or default_manifest()).head(cfg.ceiling_scans)
    keys = ("target_spacing", "roi_size", "hu_window", "label_interpolation")
    seen: dict[str, list[str]] = {}
    settings: dict[str, dict] = {}
    for path in [Path(c) for c in cfg.ceiling_configs] or experiment_configs():
        data = resolved_config(path)["data"]
        key = repr([data.get(k) for k in keys])
        seen.setdefault(key, []).append(path.stem if path.parent == EXPERIMENTS else f"{path.parent.name}/{path.stem}")
        settings[key] = data
    rows = []
    for key, names in seen.items():
        data = settings[key]
        scores = [grid_ceiling(data, r.image, r.label) for r in table.itertuples()]
        spacing = "x".join(f"{v:g}" for v in data["target_spacing"]) if data["target_spacing"] else "native"
        what = (f"ceiling of {', '.join(names)}: {'x'.join(map(str, data['roi_size'] or ['scan']))} at {spacing} mm, "
                f"{data.get('label_interpolation', 'nearest')} labels ({len(scores)} scans; HD95 "
                f"{np.mean([s['ceiling_hd95'] for s in scores]):.2f} mm, ASSD "
                f"{np.mean([s['ceiling_assd'] for s in scores]):.2f} mm)")
        rows.append({"what": what, "ours": float(np.mean([s["ceiling_dice"] for s in scores])),
                     "reference": float("nan"), "unit": "DSC", "ratio": float("nan"), "reference_name": "-"})
    return rows


def machine_header(cfg: BenchConfig) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, GPU: {gpu}, device benchmarked: {cfg.device}")


def to_markdown(rows: list[dict], header: str) -> str:
    lines = ["# stvnet bench", "", header, "",
             "| benchmark | ours | reference | unit | ratio (>1: ours better) | reference is |", "|---|---|---|---|---|---|"]
    for r in rows:
        ref = "-" if np.isnan(r["reference"]) else f"{r['reference']:.4g}"
        ratio = "-" if np.isnan(r["ratio"]) else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['what']} | {r['ours']:.4g} | {ref} | {r['unit']} | {ratio} | {r['reference_name']} |")
    return "\n".join(lines) + "\n"


def run_bench(cfg: BenchConfig, out: str | Path | None = None, manifest: str | None = None,
              sections: tuple[str, ...] = ("training", "inference", "metrics", "loader", "data", "memory", "ddp",
                                        "ceiling"),
              data_sizes: tuple[int, ...] = (), data_config: str | None = None) -> str:
    """Run the chosen sections, print and optionally save the Markdown table; returns it. ``data_sizes`` and
    ``data_config`` choose the data section's cohort sizes and experiment (see :mod:`stvnet.bench_data`)."""

    torch.manual_seed(0)
    header = machine_header(cfg)
    print(header, flush=True)
    rows: list[dict] = []
    funcs = {"training": bench_training, "inference": bench_inference, "metrics": bench_metrics,
             "loader": lambda c: bench_loader(c, manifest), "memory": bench_memory, "ddp": bench_ddp,
             "gpu_memory": bench_gpu_memory, "ceiling": lambda c: bench_ceiling(c, manifest), "data": lambda c: bench_data(c, manifest, data_sizes, data_config)}
    for name in sections:
        t0 = time.perf_counter()
        section = funcs[name](cfg)
        rows.extend(section)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        print(to_markdown(section, "").split("\n", 4)[-1], flush=True)
    table = to_markdown(rows, header)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
    return table
