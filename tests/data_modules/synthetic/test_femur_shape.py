"""The femur shape model (LLP26) as the generator uses it: a closed surface, anatomical landmarks, exact distances."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage

from data_modules.synthetic.femur_shape import distance_grid, femur_instance, fit_sphere, n_modes


def _volume(vertices: np.ndarray, triangles: np.ndarray) -> float:
    """Enclosed volume by the divergence theorem (positive for outward normals)."""
    v = vertices[triangles]
    return float(np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0)


def test_the_mean_femur_is_a_closed_outward_surface_of_an_adult_femur():
    femur = femur_instance([], head_radius=23.0)
    edges = Counter(tuple(sorted(e)) for t in femur.triangles for e in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
    assert set(edges.values()) == {2}  # watertight: every edge between exactly two triangles
    directed = Counter((a, b) for t in femur.triangles for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
    assert max(directed.values()) == 1  # consistently oriented
    assert 300e3 < _volume(femur.vertices, femur.triangles) < 700e3  # mm3: an adult femur is ~0.4-0.6 l
    length = femur.vertices[:, 2].max() - femur.vertices[:, 2].min()
    assert 380 < length < 500
    assert 120 < femur.neck_shaft_angle < 135
    assert femur.shaft_dir[2] < -0.95 and femur.shaft_dir[0] > 0.05  # distal, towards the knee's midline (+x)
    assert femur.neck_dir[0] > 0.5 and femur.neck_dir[1] > 0.1  # the neck points medially and anteverted
    # the lesser trochanter lies posteromedially, 35-75 mm below the head's centre
    assert -75 < femur.lesser[2] < -35 and femur.lesser[1] < -20


def test_instances_vary_in_shape_keep_their_landmarks_and_take_the_head_radius_asked_for():
    rng = np.random.default_rng(0)
    angles, volumes = [], []
    for _ in range(8):
        femur = femur_instance(np.clip(rng.standard_normal(n_modes()), -2.5, 2.5), head_radius=24.0)
        head = femur.vertices[np.linalg.norm(femur.vertices, axis=1) < 26.0]
        centre, radius = fit_sphere(head)
        assert np.linalg.norm(centre) < 1.5 and radius == pytest.approx(24.0, abs=1.0)
        angles.append(femur.neck_shaft_angle)
        volumes.append(_volume(femur.vertices, femur.triangles))
        assert 110 < femur.neck_shaft_angle < 145
    assert np.ptp(angles) > 3.0  # the modes change the femur's geometry, not only its size
    assert np.ptp(volumes) / np.mean(volumes) > 0.02


def test_the_distance_grid_is_zero_on_the_surface_signed_and_exact_near_it():
    femur = femur_instance([1.0, -1.0, 0.5], head_radius=22.0)
    grid = distance_grid(femur, (-120.0, 35.0))
    top = femur.vertices[femur.vertices[:, 2] > -110.0]
    points = tuple(torch.from_numpy(top[:, i].astype(np.float32)) for i in range(3))
    assert np.abs(grid.sample(points).numpy()).max() < 0.6  # the surface's nodes sit on the zero level
    # 3 mm along each node's outward normal (the mean of its triangles' normals) the field reads +3, inside -3
    v = femur.vertices[femur.triangles]
    face_normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    normals = np.zeros_like(femur.vertices)
    for k in range(3):
        np.add.at(normals, femur.triangles[:, k], face_normals)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    chosen = (femur.vertices[:, 2] > -110.0) & (np.linalg.norm(femur.vertices, axis=1) < 25.0)  # the head: convex
    for offset in (3.0, -3.0):
        moved = femur.vertices[chosen] + offset * normals[chosen]
        values = grid.sample(tuple(torch.from_numpy(moved[:, i].astype(np.float32)) for i in range(3))).numpy()
        assert np.median(values) == pytest.approx(offset, abs=0.3)
        assert (np.sign(values) == np.sign(offset)).all()
    inside = grid.values.numpy() < 0
    # one solid piece without cavities: the parity fill leaves no stray rays
    labels, count = ndimage.label(inside)
    assert count == 1 and (ndimage.binary_fill_holes(inside) == inside).all()
