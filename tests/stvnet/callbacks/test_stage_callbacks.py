"""Multi-stage ST-V-Net training: frozen parts, stage switches, resume mid-stage, and a leak-free prior."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from data_modules.datamodule import FemurDataModule
from data_modules.shape_prior import build_shape_prior
from stvnet.callbacks import Stage, StageSchedule
from stvnet.stages import ActiveStage
from stvnet.lightning_module import FemurSegmenter
from stvnet.models import STVNet, VNet
from tests.conftest import tiny_data_args

STAGES = [
    Stage(name="vnet", epochs=1, train=["backbone"], loss_weights={"backbone": 1.0}),
    Stage(name="stn", epochs=2, train=["stn", "fusion"], lr_scale=0.5, loss_weights={"prior": 1.0, "seg": 1.0}),
    Stage(name="all", epochs=1, train=None, lr_scale=0.1, loss_weights={"seg": 1.0, "prior": 0.5}),
]


def make_module() -> FemurSegmenter:
    net = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4, 8))
    return FemurSegmenter(net, lr=0.01)


def make_trainer(root: Path, max_epochs: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs, default_root_dir=str(root), logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2, limit_val_batches=1,
        callbacks=[StageSchedule(STAGES), *callbacks],
    )


class Recorder(L.Callback):
    """Per epoch: stage, lr, which parts got gradients and which parameters changed."""

    def __init__(self):
        self.epochs: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        e = trainer.current_epoch
        if e not in self.epochs:
            self.epochs[e] = {
                "stage": pl_module.stage.name,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "before": {k: v.detach().clone() for k, v in pl_module.net.named_parameters()},
                "grads": set(),
            }

    def on_after_backward(self, trainer, pl_module):
        rec = self.epochs[trainer.current_epoch]
        for name, p in pl_module.net.named_parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                rec["grads"].add(name.split(".")[0])

    def on_train_epoch_end(self, trainer, pl_module):
        rec = self.epochs[trainer.current_epoch]
        rec["changed"] = {
            name.split(".")[0] for name, p in pl_module.net.named_parameters() if not torch.equal(p, rec["before"][name])
        }
        del rec["before"]


@pytest.mark.slow
def test_each_stage_trains_exactly_its_parts(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    rec = Recorder()
    make_trainer(tmp_path, 4, rec).fit(make_module(), datamodule=dm)
    expected = {0: {"backbone"}, 1: {"stn", "fusion"}, 2: {"stn", "fusion"}, 3: {"backbone", "stn", "fusion"}}
    for epoch, parts in expected.items():
        assert rec.epochs[epoch]["grads"] == parts, f"epoch {epoch}"
        assert rec.epochs[epoch]["changed"] == parts, f"epoch {epoch}"
    assert [rec.epochs[e]["stage"] for e in range(4)] == ["vnet", "stn", "stn", "all"]
    assert rec.epochs[1]["lr"] == pytest.approx(0.005)
    assert rec.epochs[3]["lr"] == pytest.approx(0.001)


@pytest.mark.slow
def test_resume_mid_stage_continues_that_stage(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, 2, ckpt_cb).fit(make_module(), datamodule=dm)  # killed after epoch 1, inside stage 'stn'
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["stvnet_stage"]["name"] == "stn" and ckpt["epoch"] == 1

    rec = Recorder()
    resumed = make_module()
    make_trainer(tmp_path, 4, rec).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert sorted(rec.epochs) == [2, 3]
    assert rec.epochs[2]["stage"] == "stn" and rec.epochs[2]["grads"] == {"stn", "fusion"}
    assert rec.epochs[2]["changed"] == {"stn", "fusion"}
    assert rec.epochs[3]["stage"] == "all" and rec.epochs[3]["grads"] == {"backbone", "stn", "fusion"}
    # the prior came back with the checkpoint rather than being rebuilt
    assert torch.equal(resumed.net.prior, ckpt["state_dict"]["net.prior"])


def test_stage_schedule_validates_config():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        StageSchedule([Stage(name="a", epochs=0)])
    with pytest.raises(ValueError, match="unique"):
        StageSchedule([Stage(name="a", epochs=1), Stage(name="a", epochs=1)])
    schedule = StageSchedule(STAGES)
    assert [schedule.index_for_epoch(e) for e in range(6)] == [0, 1, 1, 2, 2, 2]


def test_part_lr_scale_gives_a_part_its_own_rate():
    """The fusion can learn faster than the STN in the same stage; every trainable parameter is optimised once."""
    schedule = StageSchedule([Stage(name="stn", epochs=1, train=["stn", "fusion"], lr=1e-3, part_lr_scale={"fusion": 10})])
    module = FemurSegmenter(STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4, 8)), scheduler="none")
    module.set_stage(schedule.active(0, module.lr))
    optimizer = module.configure_optimizers()
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(rates)
    assert [rates[id(p)] for p in module.net.fusion.parameters()] == pytest.approx([1e-2, 1e-2])
    assert set(rates[id(p)] for p in module.net.stn.parameters()) == {1e-3}
    assert not any(id(p) in rates for p in module.net.backbone.parameters())
    with pytest.raises(ValueError, match="part_lr_scale names unknown parts"):
        bad = StageSchedule([Stage(name="a", epochs=1, part_lr_scale={"decoder": 2.0})])
        bad.setup(L.Trainer(logger=False, enable_progress_bar=False, max_epochs=1), make_module(), "fit")


def test_freezing_an_untrained_backbone_from_the_start_is_refused(tiny_cohort, tmp_path):
    """stvnet_from_vnet.yaml without init_weights would tune an STN on a random V-Net: say so instead."""
    stages = [Stage(name="stn", epochs=1, train=["stn", "fusion"], loss_weights={"prior": 1.0, "seg": 1.0})]
    trainer = L.Trainer(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=1,
                        limit_val_batches=1, callbacks=[StageSchedule(stages)])
    with pytest.raises(ValueError, match="freezes the backbone from the first epoch.*init_weights"):
        trainer.fit(make_module(), datamodule=FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits")))


def _copy_cohort(src: Path, dst: Path) -> Path:
    shutil.copytree(src.parent, dst)
    return dst / src.name


def _replace_with_box(path: Path) -> None:
    """Overwrite a label file with a small cube on the same grid."""
    img = nib.load(path)
    box = np.zeros(img.shape, np.uint8)
    box[5:15, 5:15, 5:15] = 1
    nib.save(nib.Nifti1Image(box, img.affine), path)


def test_prior_uses_only_training_labels(tiny_cohort, tmp_path):
    args = tiny_data_args(tiny_cohort, tmp_path / "splits")
    dm = FemurDataModule(**args)
    dm.prepare_data()
    prior = dm.shape_prior()
    train_labels = [s["label"].data[0] for s in dm.subjects("train")]
    assert torch.allclose(prior, build_shape_prior(train_labels))
    assert 0 < prior.max() <= 1

    # replace every validation and test label by a box: the prior must not move
    copy = _copy_cohort(tiny_cohort, tmp_path / "cohort")
    table = pd.read_csv(copy)
    held_out = set(dm.subject_ids("val")) | set(dm.subject_ids("test"))
    for _, row in table[table["subject_id"].isin(held_out)].iterrows():
        _replace_with_box(copy.parent / row["label"])
    dm2 = FemurDataModule(**dict(args, manifest=str(copy), splits_dir=str(tmp_path / "splits2")))
    dm2.prepare_data()
    assert dm2.subject_ids("train") == dm.subject_ids("train")
    assert torch.equal(dm2.shape_prior(), prior)

    # while changing one training label does move it
    first_train = dm.subject_ids("train")[0]
    _replace_with_box(copy.parent / table[table["subject_id"] == first_train].iloc[0]["label"])
    dm3 = FemurDataModule(**dict(args, manifest=str(copy), splits_dir=str(tmp_path / "splits3")))
    dm3.prepare_data()
    assert not torch.equal(dm3.shape_prior(), prior)


def test_com_aligned_prior_is_sharper():
    a = torch.zeros(16, 16, 16)
    b = torch.zeros(16, 16, 16)
    a[2:6, 2:6, 2:6] = 1
    b[8:12, 8:12, 8:12] = 1
    assert build_shape_prior([a, b], "roi").max() == 0.5
    assert build_shape_prior([a, b], "com").max() == 1.0


def test_soft_labels_make_a_prior_of_their_femur_fractions_not_of_every_touched_voxel():
    """``label_interpolation: linear`` labels hold each voxel's femur fraction: the prior averages them (a boundary
    voxel a quarter femur weighs a quarter), it does not count every voxel the femur touches as femur."""
    soft = torch.zeros(8, 8, 8)
    soft[2:6, 2:6, 2:6] = 1.0
    soft[6, 2:6, 2:6] = 0.25  # the boundary layer
    prior = build_shape_prior([soft, soft])
    assert prior[0, 6, 3, 3] == 0.25 and prior.sum() == soft.sum()


def test_stage_lengths_scale_to_max_epochs():
    schedule = StageSchedule([Stage(name="a", epochs=14), Stage(name="b", epochs=4), Stage(name="c", epochs=6)],
                             scale_to_max_epochs=True)
    schedule.rescale(6)  # 3.5, 1, 1.5: the first of the tied remainders gets the spare epoch
    assert [s.epochs for s in schedule.stages] == [4, 1, 1] and schedule.starts == [0, 4, 5]
    assert schedule.index_for_epoch(4) == 1 and schedule.index_for_epoch(5) == 2 and schedule.index_for_epoch(99) == 2
    schedule.rescale(7)  # 4.08, 1.17, 1.75: the largest remainder
    assert [s.epochs for s in schedule.stages] == [4, 1, 2]
    schedule.rescale(48)
    assert [s.epochs for s in schedule.stages] == [28, 8, 12] and schedule.total_epochs == 48
    with pytest.raises(ValueError, match="max_epochs=2 cannot hold 3 stages"):
        schedule.rescale(2)
    # every stage keeps one epoch; the longest gives up what that costs
    short = StageSchedule([Stage(name="a", epochs=10), Stage(name="b", epochs=1), Stage(name="c", epochs=1)])
    short.rescale(3)
    assert [s.epochs for s in short.stages] == [1, 1, 1]
    short.rescale(5)
    assert [s.epochs for s in short.stages] == [3, 1, 1]


def test_the_active_stage_is_what_the_module_trains_with():
    schedule = StageSchedule([
        Stage(name="a", epochs=2, train=["backbone"], lr_scale=0.5, loss_weights={"backbone": 1.0}, warmup_epochs=0.5,
              part_lr_scale={"backbone": 2.0}),
        Stage(name="b", epochs=3, lr=1e-4, lr_scale=0.5),
    ])
    assert schedule.active(0, 0.01) == ActiveStage(
        index=0, name="a", train=("backbone",), lr=0.005, loss_weights={"backbone": 1.0}, epochs=2, warmup_epochs=0.5,
        part_lr_scale={"backbone": 2.0})
    assert schedule.active(1, 0.01).lr == 1e-4  # an explicit rate wins over the scale
    # what a checkpoint records reads back as the same stage
    assert ActiveStage.from_checkpoint(schedule.active(0, 0.01).to_checkpoint()) == schedule.active(0, 0.01)
    with pytest.raises(ValueError, match="unknown loss terms"):
        ActiveStage(index=0, name="x", lr=1.0, loss_weights={"shape": 1.0})
    assert schedule.freezes_parts and schedule.final_index == 1
    assert not StageSchedule([Stage(name="all", epochs=1)]).freezes_parts


def test_a_checkpoint_of_another_schedule_is_refused_on_resume(caplog):
    schedule = StageSchedule(STAGES)
    saved = StageSchedule([Stage(name=s.name, epochs=3) for s in STAGES]).state_dict()
    with caplog.at_level("INFO"):
        schedule.load_state_dict(saved)
    assert [s.epochs for s in schedule.stages] == [3, 3, 3] and schedule.starts == [0, 3, 6]
    assert "Stage lengths restored from the checkpoint: vnet x3, stn x3, all x3" in caplog.messages
    saved = StageSchedule([Stage(name="vnet", epochs=5), Stage(name="finetune", epochs=2)]).state_dict()
    with pytest.raises(ValueError, match=r"trained with stages \['vnet', 'finetune'\], this schedule has "
                                         r"\['vnet', 'stn', 'all'\]: resume with the run's own config.yaml"):
        schedule.load_state_dict(saved)


def test_st_vnet_starts_from_a_trained_vnet_checkpoint(tmp_path):
    vnet_module = FemurSegmenter(VNet(base_channels=4, depth=2, kernel_size=3))
    with torch.no_grad():
        for p in vnet_module.net.parameters():
            p.add_(torch.randn_like(p))  # "trained" weights, different from any fresh init
    path = tmp_path / "vnet.ckpt"
    torch.save({"state_dict": vnet_module.state_dict()}, path)
    st = FemurSegmenter(STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,)), init_weights=str(path))
    for name, p in vnet_module.net.state_dict().items():
        assert torch.equal(st.net.backbone.state_dict()[name], p), name
    with pytest.raises(ValueError, match="no weights match"):
        FemurSegmenter(VNet(base_channels=8, depth=3, kernel_size=5), init_weights=str(path))


def test_checkpoint_of_a_run_started_from_init_weights_loads_without_that_file(tmp_path):
    """A checkpoint alone is enough to predict, even when training started from another checkpoint."""
    source = FemurSegmenter(VNet(base_channels=4, depth=2, kernel_size=3))
    path = tmp_path / "vnet.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    child = FemurSegmenter(STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,)), init_weights=str(path))
    child.net.set_prior(torch.full((1, 1, 16, 16, 16), 0.5))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(child)
    trainer.save_checkpoint(tmp_path / "child.ckpt")
    path.unlink()
    net = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,))
    restored = FemurSegmenter.load_from_checkpoint(tmp_path / "child.ckpt", net=net, map_location="cpu")
    for name, value in child.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    # a fresh training run that names the missing file is told what to do
    with pytest.raises(FileNotFoundError, match="init_weights"):
        FemurSegmenter(VNet(base_channels=4, depth=2, kernel_size=3), init_weights=str(path))


@pytest.mark.mutation_target("on_train_start")
def test_the_schedule_refuses_at_train_start_what_would_fail_or_train_the_wrong_thing():
    """Checked in-process with stand-ins for the trainer (no DDP process group needed): a DDP model that does not
    look for unused parameters under a schedule that freezes parts; a first stage that freezes a V-Net nobody
    trained. A resumed run, a run started from --model.init_weights and DDP with unused-parameter search pass."""
    from types import SimpleNamespace
    from unittest.mock import Mock

    from torch.nn.parallel import DistributedDataParallel

    schedule = StageSchedule([Stage(name="stn", epochs=2, train=["stn"]), Stage(name="all", epochs=1)])

    def trainer(model=None, epoch=0, ckpt_path=None):
        return SimpleNamespace(strategy=SimpleNamespace(model=model), current_epoch=epoch, ckpt_path=ckpt_path)

    def module(init_weights=None):
        return SimpleNamespace(stage=ActiveStage.of(schedule.stages[0], 0, 1e-3), hparams={"init_weights": init_weights})

    strict_ddp = Mock(spec=DistributedDataParallel, find_unused_parameters=False)
    with pytest.raises(ValueError, match=r"^the stage schedule freezes parts of the network, .* use --trainer\.strategy "
                                         r"ddp \(stvnet train picks ddp_find_unused_parameters_true for staged runs\)"):
        schedule.on_train_start(trainer(strict_ddp), module("vnet.ckpt"))
    schedule.on_train_start(trainer(Mock(spec=DistributedDataParallel, find_unused_parameters=True)),
                            module("vnet.ckpt"))
    with pytest.raises(ValueError, match=r"^stage 'stn' freezes the backbone from the first epoch, but it was never "
                                         r"trained: pass --model\.init_weights <a trained backbone's checkpoint>"):
        schedule.on_train_start(trainer(), module())
    schedule.on_train_start(trainer(ckpt_path="last.ckpt"), module())  # resumed at epoch 0: its weights are trained
    schedule.on_train_start(trainer(epoch=1), module())
    # a fresh run whose first stage trains the V-Net (the paper's order) needs no trained weights
    paper = StageSchedule([Stage(name="vnet", epochs=2, train=["backbone"]), Stage(name="stn", epochs=1, train=["stn"])])
    paper.on_train_start(trainer(), SimpleNamespace(stage=ActiveStage.of(paper.stages[0], 0, 1e-3), hparams={}))


def test_setup_scales_stage_lengths_only_for_a_finite_real_run_and_warns_when_stages_are_cut(caplog):
    """Checked with stand-ins for the trainer and the module: stage lengths scale to max_epochs for a real run with
    a positive, different epoch budget (logged), never for fast_dev_run or an unlimited run (-1); without scaling, a
    budget shorter than the stages is warned about; unknown parts are named with the network's parts."""
    import logging
    from types import SimpleNamespace

    def run(max_epochs, scale=True, fast_dev_run=False, stages=None):
        schedule = StageSchedule(stages or [Stage(name="vnet", epochs=4, train=["backbone"]), Stage(name="all", epochs=2)],
                                 scale_to_max_epochs=scale)
        module = SimpleNamespace(parts=lambda: ["backbone", "stn", "fusion"], lr=1e-3, set_stage=lambda s: setattr(module, "stage", s))
        schedule.setup(SimpleNamespace(max_epochs=max_epochs, fast_dev_run=fast_dev_run), module, "fit")
        return [s.epochs for s in schedule.stages], module.stage

    with caplog.at_level(logging.INFO):
        assert run(12)[0] == [8, 4]
    assert "Stage lengths scaled to max_epochs: vnet x8, all x4" in caplog.text
    assert run(6)[0] == [4, 2] and run(-1)[0] == [4, 2] and run(None)[0] == [4, 2]
    assert run(3, fast_dev_run=True)[0] == [4, 2]
    assert run(3)[0] == [2, 1]
    assert run(1, stages=[Stage(name="all", epochs=4)])[0] == [1]  # one epoch is a budget too
    lengths, stage = run(12, scale=False)
    assert lengths == [4, 2] and stage.name == "vnet" and stage.index == 0
    with pytest.warns(UserWarning, match=r"trainer\.max_epochs=5 ends training before the last stage \(the stages "
                                         r"need 6 epochs\)"):
        run(5, scale=False)
    with pytest.warns(UserWarning, match=r"trainer\.max_epochs=1 ends training before the last stage"):
        run(1, scale=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(6, scale=False), run(-1, scale=False), run(None, scale=False), run(1, scale=False, fast_dev_run=True)
    with pytest.raises(ValueError, match=r"^stage 'x' trains unknown parts \['decoder'\]; this network has "
                                         r"\['backbone', 'fusion', 'stn'\]$"):
        run(6, stages=[Stage(name="x", epochs=1, train=["backbone", "decoder"])])


@pytest.mark.mutation_target("build_shape_prior")
def test_com_alignment_moves_each_label_to_the_mean_centre_by_whole_voxels():
    a, b = torch.zeros(16, 16, 16), torch.zeros(16, 16, 16)
    a[2:6, 4:8, 6:10] = 1  # centre of mass (3.5, 5.5, 7.5)
    b[8:12, 4:8, 0:4] = 1  # (9.5, 5.5, 1.5): the mean centre is (6.5, 5.5, 4.5)
    prior = build_shape_prior([a, b], "com")
    assert prior.shape == (1, 16, 16, 16) and prior.dtype == torch.float32
    expected = torch.zeros(1, 16, 16, 16)
    expected[0, 5:9, 4:8, 3:7] = 1.0  # both cubes land on the same voxels, nothing is shifted in from outside
    assert torch.equal(prior, expected)
    with pytest.raises(ValueError, match=r"^a shape prior needs at least one training label$"):
        build_shape_prior([])
    with pytest.raises(ValueError, match=r"^alignment must be one of \('roi', 'com'\), got 'mean'$"):
        build_shape_prior([a], "mean")


def test_the_datamodules_prior_is_the_same_with_or_without_the_cache_and_honours_the_alignment(tiny_cohort, tmp_path):
    args = tiny_data_args(tiny_cohort, tmp_path / "splits")
    cached = FemurDataModule(**args)
    cached.prepare_data()
    labels = [s["label"].data[0] for s in cached.subjects("train")]
    assert torch.equal(cached.shape_prior("com"), build_shape_prior(labels, "com"))
    assert not torch.equal(cached.shape_prior("com"), cached.shape_prior("roi"))
    uncached = FemurDataModule(**dict(args, cache=False))
    uncached.prepare_data()
    assert torch.equal(uncached.shape_prior("roi"), cached.shape_prior("roi"))


def test_a_schedule_from_yaml_mappings_is_the_same_as_from_stages():
    as_dicts = StageSchedule([{"name": "vnet", "epochs": 2, "train": ["backbone"]}, {"name": "all", "epochs": 1}])
    as_stages = StageSchedule([Stage(name="vnet", epochs=2, train=["backbone"]), Stage(name="all", epochs=1)])
    assert as_dicts.stages == as_stages.stages and not as_dicts.scale_to_max_epochs
    with pytest.raises(ValueError, match=r"^StageSchedule needs at least one stage$"):
        StageSchedule([])


def test_rescaled_stages_share_the_leftover_epochs_in_order_and_an_empty_schedule_is_refused():
    """Four equal stages in 7 epochs: the three leftover epochs go to the first three stages, one each."""
    schedule = StageSchedule([Stage(name=n, epochs=1) for n in "abcd"])
    schedule.rescale(7)
    assert [s.epochs for s in schedule.stages] == [2, 2, 2, 1] and schedule.starts == [0, 2, 4, 6]
    assert StageSchedule([Stage(name="a", epochs=3)]).scale_to_max_epochs is False  # scaling is opted into
    with pytest.raises(ValueError, match="^StageSchedule needs at least one stage$"):
        StageSchedule([])


@pytest.mark.mutation_target("build_shape_prior")
def test_a_shape_prior_is_one_channel_and_its_errors_say_what_is_wrong():
    labels = [torch.zeros(4, 5, 6), torch.ones(4, 5, 6)]
    prior = build_shape_prior(labels)
    assert prior.shape == (1, 4, 5, 6) and torch.all(prior == 0.5)
    assert torch.equal(build_shape_prior(labels[1:]), torch.ones(1, 4, 5, 6))  # one training label is its own prior
    with pytest.raises(ValueError, match="^a shape prior needs at least one training label$"):
        build_shape_prior([])
    with pytest.raises(ValueError, match=r"^alignment must be one of \('roi', 'com'\), got 'rigid'$"):
        build_shape_prior(labels, "rigid")


def test_com_alignment_loses_what_leaves_the_box_instead_of_filling_it():
    """A label at the box's edge shifted towards the mean centre leaves empty voxels behind, not bone."""
    a, b = torch.zeros(8, 8, 8), torch.zeros(8, 8, 8)
    a[0:2, 3:5, 3:5] = 1  # centre x 0.5
    b[4:6, 3:5, 3:5] = 1  # centre x 4.5: both move 2 voxels towards x 2.5
    prior = build_shape_prior([a, b], "com")[0]
    assert prior.sum() == 8 and torch.all(prior[2:4, 3:5, 3:5] == 1.0)  # both labels whole, on top of each other


def test_rescaling_a_schedule_leaves_the_callers_stages_as_they_were():
    """A schedule owns copies: scaling it to another run's max_epochs (or restoring a checkpoint's lengths) does not
    change the Stage objects it was built from, which another schedule may be built from next."""
    stages = [Stage(name="a", epochs=1, train=["backbone"]), Stage(name="b", epochs=3)]
    schedule = StageSchedule(stages, scale_to_max_epochs=True)
    schedule.rescale(8)
    schedule.load_state_dict({"stages": [{"name": "a", "epochs": 5}, {"name": "b", "epochs": 5}]})
    assert [s.epochs for s in stages] == [1, 3] and [s.epochs for s in StageSchedule(stages).stages] == [1, 3]
