"""One source of truth for the torch version: the CPU install (Makefile) and the GPU install (environment.yml) get
the version CI tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pin() -> str:
    (pin,) = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    return pin


def test_the_tested_torch_is_the_pinned_one():
    assert torch.__version__.split("+")[0] == _pin()


def test_makefile_and_environment_install_the_pinned_torch():
    printed = subprocess.run(["make", "-s", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True).stdout
    assert f"pip install --quiet torch=={_pin()}" in printed
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert not [d for d in conda if re.match(r"(py)?torch|pytorch-cuda", d)]  # no second, older source of torch
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert "-e .[dev]" in pip and not [line for line in pip if "torch" in line and "==" in line]
