"""Per-subject validation rows across DDP ranks: a distributed sampler pads the last batch with repeated subjects,
so rows are gathered from every rank and each subject is kept once before anything is averaged."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of every process (this one's alone without DDP), one per ``subject_id``, in id order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everything: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everything, rows)
        rows = [r for part in everything for r in (part or [])]
    unique = {r["subject_id"]: r for r in rows}
    return [unique[k] for k in sorted(unique)]
