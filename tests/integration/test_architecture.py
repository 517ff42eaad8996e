"""The floor plan holds: the import contracts of ``.importlinter`` pass on this checkout and fail on a planted cycle,
and the entry point stays light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(root / "src"), str(root)))}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_import_contracts_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_planted_cycle_breaks_the_contracts(tmp_path):
    for part in ("src", "data_modules"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    # a callback that reaches up to the training command: callbacks -> training -> callbacks
    planted = tmp_path / "src" / "stvnet" / "callbacks" / "epoch_seed.py"
    planted.write_text(planted.read_text() + "\nfrom stvnet.training import main  # noqa: E402,F401\n")
    done = _lint(tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    report = done.stdout
    assert "no import cycles between the modules of any package, at any depth BROKEN" in report
    assert "entry point -> commands -> library core (every module in a layer) BROKEN" in report
    assert "stvnet.callbacks.epoch_seed -> stvnet.training" in report


def test_the_entry_point_loads_no_torch():
    """``stvnet --help`` (and any mistyped command) answers at once: torch, Lightning and TorchIO load with the
    subcommand that needs them."""
    code = ("import sys; from stvnet.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'lightning', 'torchio', 'monai') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
