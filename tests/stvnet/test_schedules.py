"""The learning-rate schedule and the validation rows' de-duplication, on their own."""

from __future__ import annotations

import math

import pytest
import torch

from stvnet.schedules import warmup_cosine
from stvnet.validation_rows import gather_unique


def test_warm_up_is_linear_then_the_cosine_ends_at_two_percent_and_stays():
    factor = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [factor(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factor(4) == pytest.approx(1.0)  # the cosine starts at the full rate
    assert factor(9) == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(14) == pytest.approx(0.02) and factor(40) == pytest.approx(0.02)  # no climb after the end
    assert warmup_cosine(0, 10)(0) == pytest.approx(1.0)


def test_each_parameter_group_decays_to_two_percent_of_its_own_rate():
    """Why the schedule is a LambdaLR: a stage's parts may train at different rates (part_lr_scale)."""
    slow, fast = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [slow], "lr": 0.01}, {"params": [fast], "lr": 0.1}], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, 5))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0002, 0.002])


def test_validation_rows_keep_each_subject_once_in_id_order():
    rows = [{"subject_id": "s2", "dice": 0.8}, {"subject_id": "s1", "dice": 0.9}, {"subject_id": "s2", "dice": 0.8}]
    assert gather_unique(rows) == [{"subject_id": "s1", "dice": 0.9}, {"subject_id": "s2", "dice": 0.8}]
