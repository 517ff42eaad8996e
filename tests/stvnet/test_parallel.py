"""stvnet.parallel: independent jobs in spawned worker processes that share the cores, results in order."""

from __future__ import annotations

import os

import pytest
import torch

from stvnet.parallel import map_in_processes

pytestmark = pytest.mark.not_in_mutation_run  # stvnet.parallel is not a mutated module


def _probe(x: int) -> tuple[int, int, int]:
    return x * x, os.getpid(), torch.get_num_threads()


def test_jobs_run_in_worker_processes_with_a_share_of_the_cores_and_come_back_in_order():
    results = map_in_processes(_probe, [3, 1, 2, 5], workers=2)
    assert [r[0] for r in results] == [9, 1, 4, 25]
    assert os.getpid() not in {r[1] for r in results}
    assert {r[2] for r in results} == {max(1, (os.cpu_count() or 1) // 2)}


def test_one_worker_or_one_job_runs_here():
    assert map_in_processes(_probe, [3, 4], workers=1) == [(9, os.getpid(), torch.get_num_threads())] + [
        (16, os.getpid(), torch.get_num_threads())]
    assert map_in_processes(_probe, [2], workers=4)[0][1] == os.getpid()
    assert map_in_processes(_probe, [], workers=4) == []
