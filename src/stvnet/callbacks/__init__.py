"""Training-policy callbacks."""

from stvnet.callbacks.epoch_seed import EpochSeed
from stvnet.callbacks.final_stage_checkpoint import FinalStageCheckpoint, stage_schedule
from stvnet.callbacks.optuna_pruning import OptunaPruning
from stvnet.callbacks.run_files import RunFiles
from stvnet.callbacks.stage_callbacks import StageSchedule
from stvnet.stages import Stage

__all__ = ["EpochSeed", "FinalStageCheckpoint", "OptunaPruning", "RunFiles", "Stage", "StageSchedule", "stage_schedule"]
