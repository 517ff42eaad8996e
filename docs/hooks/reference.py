"""MkDocs hook: the pages generated at build time, so they cannot drift from their sources: the home page is the
README (its links into ``docs/`` made relative to the site), the reference pages come from the parsers themselves
(every subcommand's ``--help``, every config key of the shipped experiments with its resolved value)."""

from __future__ import annotations

import os
import subprocess
import sys
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("train", "synth", "evaluate", "predict", "compare", "ablate", "sweep", "localise", "bench")
EXPERIMENTS = ("experiments/vnet.yaml", "experiments/stvnet.yaml")


def _stvnet(*args: str) -> str:
    """What ``stvnet ARGS`` prints, at a fixed width, from this checkout."""
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": os.pathsep.join((str(ROOT / "src"), str(ROOT)))}
    done = subprocess.run([sys.executable, "-m", "stvnet.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stvnet {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def cli_page() -> str:
    parts = ["# Command reference\n\nGenerated from the parsers when the site is built (`make docs`).\n",
             "## stvnet\n\n```text\n" + _stvnet("--help") + "```\n"]
    for name in SUBCOMMANDS:
        parts.append(f"## stvnet {name}\n\n```text\n" + _stvnet(name, "--help") + "```\n")
    return "\n".join(parts)


def config_page() -> str:
    parts = ["# Config reference\n\nEvery key of a training config with its resolved value, generated when the site is "
             "built (`stvnet train --config <experiment> --print_config`). Any key can be set in a YAML file or on the "
             "command line (`--data.roi_size \"[96, 96, 96]\"`); what each key means is in "
             "[`stvnet train --help`](cli.md#stvnet-train).\n"]
    for experiment in EXPERIMENTS:
        parts.append(f"## `{experiment}`\n\n```yaml\n" + _stvnet("train", "--config", experiment, "--print_config")
                     + "```\n")
    return "\n".join(parts)


def home_page() -> str:
    """The README, its ``docs/...`` links made relative to the docs folder."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Files, config) -> Files:
    for path, page in (("index.md", home_page), ("reference/cli.md", cli_page), ("reference/config.md", config_page)):
        files.append(File.generated(config, path, content=page()))
    return files
