"""Training-policy callbacks."""

from stvnet.callbacks.optuna_pruning import OptunaPruning
from stvnet.callbacks.run_files import RunFiles
from stvnet.callbacks.stage_callbacks import Stage, StageSchedule

__all__ = ["OptunaPruning", "RunFiles", "Stage", "StageSchedule"]
