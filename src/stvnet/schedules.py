"""The learning-rate schedule of a run or of each training stage."""

from __future__ import annotations

import math
from collections.abc import Callable

#: the cosine ends at this fraction of each parameter group's rate
FINAL_FRACTION = 0.02


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float = FINAL_FRACTION) -> Callable[[int], float]:
    """The rate factor at each optimiser step (counted from the optimiser's creation, restored on resume): linear
    warm-up from 1/(w+1) to 1 over ``warmup_steps`` (a stage starts with fresh AdamW moments), then a cosine down to
    ``final_fraction`` at ``total_steps``, where it stays.

    For ``torch.optim.lr_scheduler.LambdaLR``, not ``SequentialLR(LinearLR, CosineAnnealingLR)``: the floor is a
    fraction of *each* group's rate (stages scale parts' rates, ``part_lr_scale``), while ``CosineAnnealingLR`` takes
    one absolute ``eta_min`` for all groups and, past ``T_max``, climbs again."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
