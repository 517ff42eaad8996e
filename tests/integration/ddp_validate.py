"""Validate a checkpoint on 1 or N CPU processes (DDP, gloo) and write rank 0's metrics as JSON.

Run as a script by tests/integration/test_ddp.py; Lightning's DDP launcher re-runs this file for the other ranks.
"""

from __future__ import annotations

import json
import sys

import lightning as L

from data_modules.datamodule import FemurDataModule
from stvnet.inference import read_checkpoint_info
from stvnet.lightning_module import FemurSegmenter


def main(ckpt: str, out: str, devices: int) -> None:
    model = FemurSegmenter.load_from_checkpoint(ckpt, map_location="cpu")
    hparams = {k: v for k, v in read_checkpoint_info(ckpt).data_hparams.items() if not k.startswith("_")}
    datamodule = FemurDataModule(**hparams)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(model, datamodule=datamodule)
    if trainer.is_global_zero:
        with open(out, "w") as fh:
            json.dump({"world_size": trainer.world_size, **results[0]}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
