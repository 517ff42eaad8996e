"""The ``stvnet`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_modules.errors import UserError, debugging, report

SUBCOMMANDS = {
    "train": "train a model (LightningCLI: stvnet train --config experiments/vnet.yaml --data.fold 3 ...)",
    "synth": "write the synthetic QCT femur cohort (NIfTI + manifest.csv)",
    "evaluate": "score trained runs on held-out subjects: per-subject CSV, paper-style table, plots",
    "predict": "segment new scans (file, folder or manifest) with one or more checkpoints (ensemble)",
    "compare": "compare models (e.g. V-Net vs ST-V-Net) from run folders: tables, learning curves, Wilcoxon",
    "ablate": "run the {models} x {all, male, female} x folds matrix, then evaluate and compare",
    "sweep": "Optuna hyperparameter search; each trial a full (multi-GPU) training; shared, resumable studies",
    "localise": "measure femur localisation on held-out scans re-framed many ways (error in mm, label inside ROI)",
    "bench": "time training, inference, metrics and loading against MONAI (ratios from one run)",
}


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one user-error line (``<problem>; see stvnet <cmd> --help``), not the usage text."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message}; see {self.prog} --help")


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``[own args] -- [args for every stvnet train]``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _synth(argv: list[str]) -> int:
    from data_modules.synthetic import DEFAULT_COHORT_DIR, PRESETS, make_cohort

    parser = Parser(
        prog="stvnet synth",
        description="Write a deterministic synthetic QCT hip cohort with the left proximal femur labelled.",
    )
    parser.add_argument("--out", default=DEFAULT_COHORT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--subjects", type=int, default=40, help="number of subjects (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; same seed, same subjects (and bytes, with the same library versions) "
                        "(default: %(default)s)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 2.5), metavar=("X", "Y", "Z"),
                        help="voxel spacing in mm (default: 1.0 1.0 2.5, thick QCT slices)")
    parser.add_argument("--female-fraction", type=float, default=216 / 397,
                        help="fraction of women (default: the paper's 216/397)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (default: %(default)s)")
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="default: the embedded cohort's grid (--spacing); clinical: hip QCT acquisitions of "
                        "512 x 512 x 150-300 voxels at 0.6-0.9 x 1-1.25 mm, off-centre, with a calibration phantom")
    parser.add_argument("--report", action="store_true",
                        help="write a realism report of the cohort in --out (histograms, joint-space profile, views "
                        "against published QCT ranges) into OUT/realism; the cohort is written first if OUT has none")
    parser.add_argument("--report-subjects", type=int, default=10,
                        help="subjects the report measures (default: %(default)s)")
    args = parser.parse_args(argv)
    problems = [f"{option} {value}: {problem}" for option, value, ok, problem in (
        ("--subjects", args.subjects, args.subjects >= 2, "a cohort needs at least 2 subjects"),
        ("--report-subjects", args.report_subjects, args.report_subjects >= 1, "must be at least 1"),
        ("--spacing", " ".join(map(str, args.spacing)), min(args.spacing) > 0, "voxel spacings must be > 0 mm"),
        ("--female-fraction", args.female_fraction, 0.0 <= args.female_fraction <= 1.0, "must be in [0, 1]"),
        ("--workers", args.workers, args.workers >= 1, "must be at least 1"),
        ("--out", args.out, not Path(args.out).is_file(), "is a file; give a folder"),
    ) if not ok]
    if problems:
        raise UserError(*problems)
    manifest = Path(args.out) / "manifest.csv"
    if not (args.report and manifest.is_file()):
        manifest = make_cohort(args.out, n_subjects=args.subjects, seed=args.seed, spacing=tuple(args.spacing),
                               female_fraction=args.female_fraction, workers=args.workers, preset=args.preset)
        print(f"Wrote {args.subjects} subjects; manifest: {manifest}")
    if args.report:
        from data_modules.synthetic.realism import write_report

        if not (manifest.parent / "parameters.csv").is_file():
            raise UserError(f"--report: {manifest.parent} has no parameters.csv; the report measures cohorts written "
                            "by stvnet synth (it re-renders their anatomy to find each tissue)")
        print(f"Realism report: {write_report(manifest, manifest.parent / 'realism', args.report_subjects)}")
    return 0


def _evaluate(argv: list[str]) -> int:
    import os

    parser = Parser(
        prog="stvnet evaluate",
        description="Predict the held-out test set (and/or each run's validation fold) with trained runs, save the "
        "masks as NIfTI in each scan's own geometry, and write per_subject.csv, summary.csv/.md (mean ± sd per "
        "model and cohort, paired Wilcoxon tests), box plots and overlays.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (runs/<name>/<cohort>/fold<k>/<time>) or checkpoints")
    parser.add_argument("--manifest", help="cohort manifest (default: the one each run was trained on)")
    parser.add_argument("--split", choices=("test", "val", "both"), default="test",
                        help="held-out test set, the run's validation fold, or both (default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: <run>/evaluation for one run, else "
                        "<common parent>/evaluation_<models>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--no-masks", action="store_true", help="do not save predicted masks (no overlays either)")
    parser.add_argument("--largest-component", action="store_true",
                        help="score masks after keeping their largest connected component (as predict can)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs evaluated at once, each in its own process (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: at least 1 run must be evaluated at a time")
    from stvnet.evaluation import describe_run, evaluate_runs

    splits = ("test", "val") if args.split == "both" else (args.split,)
    try:
        if args.out:
            out = Path(args.out)
        elif len(args.runs) == 1:
            run = Path(args.runs[0])
            out = (run.parent.parent if run.is_file() else run) / "evaluation"
        else:
            names = "_vs_".join(dict.fromkeys(describe_run(r).model for r in args.runs))
            out = Path(os.path.commonpath([str(Path(r).resolve()) for r in args.runs])) / f"evaluation_{names}"
        evaluate_runs(args.runs, out, manifest=args.manifest, splits=splits, overwrite=args.overwrite,
                      device=args.device, save_masks=not args.no_masks, figures=not args.no_masks,
                      keep_largest=args.largest_component, workers=args.workers)
    except (FileExistsError, FileNotFoundError) as exc:  # an output folder in use, a run or scan that is not there
        raise UserError(str(exc)) from exc
    print((out / "summary.md").read_text())
    print(f"Wrote {out}")
    return 0


def _predict(argv: list[str]) -> int:
    parser = Parser(
        prog="stvnet predict",
        description="Segment the left proximal femur in new scans of any orientation and spacing. Masks are written "
        "in each input's own grid and affine as <out>/<name>.nii.gz; inputs are never overwritten.",
    )
    parser.add_argument("inputs", nargs="+", help="scans (NIfTI, NRRD), folders of NIfTI files, DICOM series folders "
                        "(one series each), or manifest CSVs (column 'image')")
    parser.add_argument("-c", "--checkpoint", action="append", required=True,
                        help="checkpoint or run folder; repeat to ensemble (probabilities are averaged)")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default: %(default)s)")
    parser.add_argument("--largest-component", action="store_true", help="keep only the largest connected component")
    parser.add_argument("--overwrite", action="store_true", help="replace existing masks in --out")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--side", choices=("left", "right"), default="left",
                        help="femur to segment; right: the scan is mirrored left-right for the same checkpoint "
                        "(default: %(default)s)")
    parser.add_argument("--strict", action="store_true",
                        help="exit non-zero when a QC check flags a scan (empty or implausible mask, unusual scan)")
    args = parser.parse_args(argv)
    from stvnet.predict import predict

    try:
        written, errors, flagged = predict(args.inputs, args.checkpoint, args.out, threshold=args.threshold,
                                           keep_largest=args.largest_component, overwrite=args.overwrite,
                                           device=args.device, side=args.side)
    except (FileNotFoundError, ValueError) as exc:  # inputs or checkpoints that cannot be used, named in the message
        raise UserError(str(exc)) from exc
    print(f"Wrote {len(written)} mask(s) and their QC records (qc.csv) to {args.out}; {flagged} flagged")
    if errors:  # the other scans' masks are written; each failed scan gets its line
        raise UserError(*errors)
    return 1 if args.strict and flagged else 0


def _compare(argv: list[str]) -> int:
    parser = Parser(
        prog="stvnet compare",
        description="Compare trained models from local records only (metrics.csv, config.yaml, and optionally an "
        "evaluation's per_subject.csv): per-cohort tables of mean ± sd over folds, learning curves, epochs to a "
        "Dice threshold, paired Wilcoxon tests.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (e.g. runs/*/all/fold*/*)")
    parser.add_argument("--evaluation", help="folder written by stvnet evaluate for these runs (test-set table)")
    parser.add_argument("--threshold", type=float, default=0.9, help="Dice threshold for convergence speed")
    parser.add_argument("--out", default="runs/comparison", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from stvnet.compare import compare_runs

    compare_runs(args.runs, args.out, evaluation=args.evaluation, threshold=args.threshold)
    print(Path(args.out, "comparison.md").read_text())
    return 0


def _ablate(argv: list[str]) -> int:
    parser = Parser(
        prog="stvnet ablate",
        description="Train every cell of {configs} x {cohorts} x {folds} [x {seeds}] in its own process (finished cells are "
        "skipped on re-runs, a crashed cell does not stop the others), then evaluate on the held-out test sets and "
        "compare. Arguments after '--' go to every 'stvnet train'.",
    )
    parser.add_argument("--configs", nargs="+", default=["experiments/vnet.yaml", "experiments/stvnet.yaml"])
    parser.add_argument("--cohorts", nargs="+", default=["all", "male", "female"], choices=["all", "male", "female"])
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="train each cell once per seed (--seed_everything; default: the configs' seed, once)")
    parser.add_argument("--splits", nargs="+", default=["test"], choices=["test", "val"],
                        help="held-out sets to evaluate: test (the paper's), val (every subject outside the test set "
                        "once, by the fold that held it out) (default: %(default)s)")
    parser.add_argument("--out", default="runs/ablation", help="study folder (default: %(default)s)")
    parser.add_argument("--no-evaluate", action="store_true", help="only train")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: evaluate and compare the cells that finished (e.g. after an interrupted "
                        "study)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained (and runs evaluated) at once, each in its own process with its share of "
                        "the cores; on a node with several GPUs each job gets one in turn, with one GPU they share it "
                        "(default: %(default)s)")
    own, extra = _split_passthrough(argv)
    args = parser.parse_args(own)
    from stvnet.ablate import check_study, run_ablation, user_errors

    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: at least 1 cell must train at a time")
    check_study(args.configs, args.folds, extra)
    try:
        status = run_ablation(args.configs, args.cohorts, args.folds, args.out, extra_args=extra,
                              evaluate=not args.no_evaluate, seeds=args.seeds, splits=tuple(args.splits),
                              jobs=args.jobs, train=not args.no_train)
    except KeyboardInterrupt:  # the running cells are stopped and recorded; train_cells said so
        return 130
    failed = [k for k, v in status.items() if v["status"] != "done"]
    report = Path(args.out) / "report.md"
    if report.is_file():
        print(report.read_text())
    print(f"{len(status) - len(failed)} cell(s) done, {len(failed)} failed; study folder: {args.out}")
    if user_errors(status):  # every failed cell was refused by stvnet train: the user can fix it
        raise UserError(*user_errors(status))
    return 1 if failed else 0


def _sweep(argv: list[str]) -> int:
    parser = Parser(
        prog="stvnet sweep",
        description="Run Optuna trials from a search space (sweeps/*.yaml). Workers started with the same --study and "
        "--storage share one study; re-running resumes it. Arguments after '--' go to every 'stvnet train'.",
    )
    parser.add_argument("--space", required=True, help="search space YAML, e.g. sweeps/stvnet.yaml")
    parser.add_argument("--trials", type=int, default=8, help="trials in the study, over all workers (default: %(default)s)")
    parser.add_argument("--study", help="study name (default: the space file's name)")
    parser.add_argument("--storage", help="journal:<file> (default: <out>/<study>.journal), sqlite:///f.db, postgresql://...")
    parser.add_argument("--out", default="runs/sweeps", help="trial run folders and results (default: %(default)s)")
    parser.add_argument("--devices", type=int, help="GPUs per trial (> 1: DDP; parameters are sampled before launch)")
    parser.add_argument("--worker", type=int, default=0, help="worker index: offsets the sampler seed (default: 0)")
    own, extra = _split_passthrough(argv)
    args = parser.parse_args(own)
    from stvnet.sweep import run_sweep

    study = run_sweep(args.space, args.trials, study_name=args.study, storage=args.storage, out=args.out,
                      devices=args.devices, worker=args.worker, extra_args=extra)
    states = state_counts(study)
    print(f"study '{study.study_name}': {states}; results in {Path(args.out) / study.study_name}")
    trials = study.get_trials(deepcopy=False)
    if trials and all(t.state.name == "FAIL" for t in trials):  # a sweep that tuned nothing must not look done
        reason = trials[0].user_attrs.get("fail_reason", "no reason recorded").splitlines()[-1]
        print(f"stvnet sweep: error: all {len(trials)} trials failed; trial 0: {reason}", file=sys.stderr)
        return 1
    return 0


def state_counts(study) -> str:
    """'3 COMPLETE, 1 PRUNED'-style count of a study's trial states."""
    from collections import Counter

    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def _bench(argv: list[str]) -> int:
    parser = Parser(
        prog="stvnet bench",
        description="Benchmark our V-Net, inference, metrics and data loading against MONAI in the same run; "
        "prints a Markdown table of medians and ratios.",
    )
    parser.add_argument("--out", default="bench_results/bench.md", help="Markdown file to write (default: %(default)s)")
    parser.add_argument("--sections", nargs="+", default=["training", "inference", "metrics", "loader", "data", "memory", "ddp",
                                                           "ceiling"],
                        choices=["training", "inference", "metrics", "loader", "data", "memory", "ddp", "gpu_memory",
                                 "ceiling"],
                        help="gpu_memory (minutes on a CPU: the GPU configs' full-size forward pass) runs only when named")
    parser.add_argument("--manifest", help="cohort for the loader, data and ceiling benchmarks (default: the synthetic "
                        "cohort)")
    parser.add_argument("--data-sizes", type=int, nargs="+", default=[],
                        help="data benchmark on the manifest's first N scans, for each N (default: all of them)")
    parser.add_argument("--data-config", help="experiment whose data settings the data benchmark uses, e.g. "
                        "experiments/gpu/stvnet.yaml (default: the datamodule's defaults, the CPU configuration's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (used by the tests)")
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.data_sizes):
        raise UserError(f"--data-sizes {' '.join(map(str, args.data_sizes))}: each size must be at least 2 scans")
    from stvnet.bench import run_bench
    from stvnet.bench_tools import BenchConfig

    cfg = BenchConfig.tiny() if args.tiny else BenchConfig()
    cfg.device = args.device
    print(run_bench(cfg, out=args.out, manifest=args.manifest, sections=tuple(args.sections),
                    data_sizes=tuple(args.data_sizes), data_config=args.data_config))
    return 0


def _localise(argv: list[str]) -> int:
    from data_modules.datamodule import FemurDataModule
    from stvnet.localise import markdown, run

    parser = Parser(
        prog="stvnet localise",
        description="Build the femur template from one fold's training scans (as stvnet train does) and measure, on "
        "that fold's validation and test scans re-framed many ways (longer field of view, off-centre, rotated), the "
        "localisation error and the share of each label inside the ROI.",
    )
    parser.add_argument("--config", default="experiments/stvnet.yaml",
                        help="experiment whose data section (ROI, spacing, splits) is used (default: %(default)s)")
    parser.add_argument("--manifest", help="cohort manifest (default: the config's)")
    parser.add_argument("--fold", type=int, help="fold whose training scans build the template (default: the config's)")
    parser.add_argument("--checkpoint", help="a run folder or checkpoint: use its data settings and fold, and also "
                        "score its masks of the re-framed scans (Dice)")
    parser.add_argument("--out", default="runs/localisation", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    predictor = None
    if args.checkpoint:
        from stvnet.inference import Predictor, find_checkpoint

        predictor = Predictor.from_checkpoint(find_checkpoint(args.checkpoint), device="auto")
        data = {k: v for k, v in predictor.data_hparams.items() if not k.startswith("_")}
    else:
        if not Path(args.config).is_file():
            raise UserError(f"--config {args.config}: no such experiment file")
        from stvnet.config import resolved_config

        data = dict(resolved_config(args.config)["data"])
    data.update({k: v for k, v in (("manifest", args.manifest), ("fold", args.fold)) if v is not None},
                roi_locator="template", num_workers=0)
    table = run(FemurDataModule(**data), args.out, predictor)
    print(markdown(table))
    print(f"Wrote {args.out}/summary.md and per_case.csv")
    return 0


def _train(argv: list[str]) -> int:
    from stvnet.training import main as train_main

    train_main(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``stvnet <subcommand> ...``; user errors become one line each and exit status 2 (see
    :mod:`data_modules.errors`)."""
    debug, argv = debugging(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, SUBCOMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items())
        print(f"usage: stvnet <subcommand> [options]\n\nsubcommands:\n{lines}\n\nRun 'stvnet <subcommand> --help' for options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"train": _train, "synth": _synth, "evaluate": _evaluate, "bench": _bench,
                "predict": _predict, "compare": _compare, "ablate": _ablate,
                "sweep": _sweep, "localise": _localise}
    if command not in handlers:
        print(f"stvnet: unknown subcommand '{command}'; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        return handlers[command](rest)
    except UserError as error:
        return report(command, error, debug)


if __name__ == "__main__":
    sys.exit(main())
