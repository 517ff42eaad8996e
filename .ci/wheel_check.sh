#!/usr/bin/env bash
# The package as a user installs it (a wheel, not the editable checkout): built, installed into a clean venv, and run
# from a folder outside the checkout, where only the package's own data (defaults.yaml, the shape model) can be found.
# It must resolve an experiment with the packaged defaults and train one tiny step.  Usage: wheel_check.sh PYTHON TORCH_SPEC
set -euo pipefail
python=$1; torch_spec=$2
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/python" -m pip wheel --quiet --no-deps -w "$work/dist" "$root"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet $torch_spec
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/stvnet-*.whl
cd "$work"
unset PYTHONPATH
stvnet=$work/venv/bin/stvnet
"$stvnet" train --config "$root/experiments/vnet.yaml" --print_config > printed.yaml
# the packaged defaults were applied: their callbacks and epoch budget are in the resolved config
grep -q "stvnet.callbacks.FinalStageCheckpoint" printed.yaml && grep -q "max_epochs: 24" printed.yaml
"$stvnet" synth --subjects 6 --spacing 3 3 4 --out cohort --workers 1
"$stvnet" train --config "$root/experiments/vnet.yaml" --data.manifest cohort/manifest.csv --data.n_folds 2 \
  --data.num_workers 0 --data.roi_size "[32, 32, 32]" --data.target_spacing "[4.0, 4.0, 4.0]" \
  --model.net.init_args.base_channels 4 --trainer.max_epochs 1 --trainer.limit_train_batches 1 \
  --trainer.limit_val_batches 1 --trainer.enable_progress_bar false --run.wandb disabled --run.out runs
ls runs/vnet/all/fold0/*/checkpoints/last.ckpt > /dev/null
echo "wheel check: the installed package resolved its packaged defaults and trained one step"
