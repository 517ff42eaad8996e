"""One source of truth for the torch version: the CPU install (Makefile) and the GPU install (environment.yml) get
the version CI tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT


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


@pytest.mark.not_in_mutation_run
def test_subprocesses_import_this_checkouts_code(tmp_path):
    """Even from another folder and with another stvnet first on the path, a test's subprocess runs this checkout."""
    decoy = tmp_path / "site" / "stvnet"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the installed copy, not the checkout under test')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(decoy.parent)])
    code = "import stvnet, data_modules; print(stvnet.__file__); print(data_modules.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to(ROOT), line
