"""Preprocessing and augmentation (data_modules/transforms.py): exact HU-window values, the ROI crop's voxels and
refusals, resampling to the target spacing, the label sampler and the augmentation ranges."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
import torchio as tio

from data_modules.transforms import RoiCrop, preprocessing, sampler


def test_hu_window_clamps_and_scales_to_exact_values():
    hu = np.array([-1000.0, -200.0, 300.0, 800.0, 1800.0, 3000.0], dtype=np.float32)
    image = tio.ScalarImage(tensor=torch.from_numpy(hu).reshape(1, 6, 1, 1), affine=np.eye(4))
    out = preprocessing(None, None, None, hu_window=(-200.0, 1800.0))(tio.Subject(image=image))
    assert out["image"].data.flatten().tolist() == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    other = preprocessing(None, None, None, hu_window=(0.0, 1000.0))(tio.Subject(image=image))
    assert other["image"].data.flatten().tolist() == pytest.approx([0.0, 0.0, 0.3, 0.8, 1.0, 1.0], abs=1e-7)


def test_hu_window_leaves_the_label_untouched():
    label = tio.LabelMap(tensor=torch.tensor([0, 1, 1, 0], dtype=torch.uint8).reshape(1, 4, 1, 1), affine=np.eye(4))
    image = tio.ScalarImage(tensor=torch.full((1, 4, 1, 1), 500.0), affine=np.eye(4))
    out = preprocessing(None, None, None)(tio.Subject(image=image, label=label))
    assert out["label"].data.flatten().tolist() == [0, 1, 1, 0]


def test_roi_crop_takes_exactly_those_voxels_and_pads_with_the_minimum():
    shape = (100, 60, 40)
    coded = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1.0  # every voxel its own value, min 1
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(coded)[None], affine=affine))
    out = RoiCrop((32, 16, 24), (0.2, 0.7, 0.9))(subject)["image"]
    data = out.data[0].numpy()
    assert data.shape == (32, 16, 24)
    assert np.array_equal(data[:, :, :16], coded[4:36, 34:50, 24:40])
    assert (data[:, :, 16:] == 1.0).all()  # padded beyond the scan with its minimum
    assert np.allclose(out.affine[:3, 3], [4 * 0.7, 34 * 0.8, 24 * 2.5])  # the ROI knows where it lies


def test_label_sampler_centres_half_the_patches_on_the_femur():
    label = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    label[0, 18:22, 18:22, 18:22] = 1  # 64 of 64000 voxels: a uniform sampler almost never lands there
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 40, 40, 40)), label=tio.LabelMap(tensor=label))
    torch.manual_seed(0)
    patches = list(itertools.islice(sampler("label", (9, 9, 9))(subject), 400))
    assert all(p["image"].spatial_shape == (9, 9, 9) for p in patches)
    on_femur = np.mean([p["label"].data[0, 4, 4, 4].item() for p in patches])
    assert 0.4 < on_femur < 0.6, on_femur
    uniform = list(itertools.islice(sampler("uniform", (9, 9, 9))(subject), 400))
    assert np.mean([p["label"].data[0, 4, 4, 4].item() for p in uniform]) < 0.05
    with pytest.raises(ValueError, match="sampler must be 'uniform' or 'label', got 'grid'"):
        sampler("grid", (9, 9, 9))


def test_roi_crop_accepts_the_edges_of_its_ranges_and_names_what_it_refuses():
    RoiCrop((1, 1, 1), (0.0, 1.0, 0.5))  # one voxel, centres on the volume's edges: valid
    for size in ((0, 8, 8), (8, 8), (8, 8, 8, 8)):
        with pytest.raises(ValueError, match=rf"^roi_size must be three positive ints, got {re.escape(str(size))}$"):
            RoiCrop(size)
    for centre in ((0.5, 0.5), (0.5, 1.2, 0.5), (-0.1, 0.5, 0.5)):
        with pytest.raises(ValueError, match=rf"^roi_center must be three fractions in \[0, 1\], got "
                                             rf"{re.escape(str(centre))}$"):
            RoiCrop((8, 8, 8), centre)


def test_preprocessing_resamples_to_the_target_spacing_and_cuts_the_roi_at_its_centre():
    """Without a locator the ROI sits at ``roi_center`` (the same box RoiCrop cuts alone); a locator is used only
    when there is an ROI to place."""
    x = np.arange(40, dtype=np.float32)[:, None, None] * np.ones((1, 20, 20), np.float32)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(x * 40.0 - 200.0)[None],
                                                affine=np.diag([2.0, 2.0, 2.0, 1.0])))
    out = preprocessing((4.0, 4.0, 4.0), (4, 4, 4), (0.25, 0.5, 0.5))(subject)
    assert out["image"].spacing == (4.0, 4.0, 4.0) and out["image"].spatial_shape == (4, 4, 4)
    alone = RoiCrop((4, 4, 4), (0.25, 0.5, 0.5))(tio.Resample(4.0)(tio.RescaleIntensity(
        (0.0, 1.0), in_min_max=(-200.0, 1800.0))(tio.Clamp(-200.0, 1800.0)(subject))))
    assert np.allclose(out["image"].affine, alone["image"].affine)
    assert torch.allclose(out["image"].data, alone["image"].data)
    assert not any(type(t).__name__ == "LocateFemur"
                   for t in preprocessing(None, None, None, locator=object()).transforms)


@pytest.mark.mutation_target("augmentation")
def test_augmentation_ranges_scale_with_strength_and_zero_turns_it_off():
    """``--data.augment`` scales every range of the documented recipe (affine ±8% scale, ±8°, ±6 mm, padded with the
    image minimum, p 0.8; gamma ±0.15 log, p 0.5; noise std up to 0.02, p 0.5): half the strength, half the ranges,
    same probabilities; 0 (or less) is no augmentation, and the default strength is 1."""
    from data_modules.transforms import augmentation

    def recipe(strength=None):
        affine, gamma, noise = (augmentation() if strength is None else augmentation(strength)).transforms
        assert (type(affine), type(gamma), type(noise)) == (tio.RandomAffine, tio.RandomGamma, tio.RandomNoise)
        return {"scales": affine.scales, "degrees": affine.degrees, "translation": affine.translation,
                "pad": affine.default_pad_value, "gamma": gamma.log_gamma_range, "noise": noise.std_range,
                "p": (affine.probability, gamma.probability, noise.probability)}

    full = recipe(1.0)
    assert full == {"scales": (0.92, 1.08) * 3, "degrees": (-8.0, 8.0) * 3, "translation": (-6.0, 6.0) * 3,
                    "pad": "minimum", "gamma": (-0.15, 0.15), "noise": (0.0, 0.02), "p": (0.8, 0.5, 0.5)}
    assert recipe() == full
    half = recipe(0.5)
    assert half["scales"] == pytest.approx((0.96, 1.04) * 3) and half["degrees"] == (-4.0, 4.0) * 3
    assert half["translation"] == (-3.0, 3.0) * 3 and half["gamma"] == pytest.approx((-0.075, 0.075))
    assert half["noise"] == pytest.approx((0.0, 0.01)) and half["p"] == full["p"] and half["pad"] == "minimum"
    assert augmentation(0.0) is None and augmentation(-1.0) is None and augmentation(1e-3) is not None


def test_roi_box_on_a_non_cubic_volume_with_an_asymmetric_centre():
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    box = RoiCrop((32, 16, 24), (0.2, 0.7, 0.9)).box(affine, (100, 60, 40))
    # start = round(fraction * n - size / 2): x 4, y 34, z 24 (its end, 48, is 8 past the last slice)
    assert np.allclose(box.affine[:3, 3], [4 * 0.7, 34 * 0.8, 24 * 2.5]) and box.size == (32, 16, 24)
    assert np.allclose(RoiCrop((10, 10, 10), None).box(np.eye(4), (30, 20, 10)).affine[:3, 3], [10, 5, 0])
