"""Femur shapes from a statistical shape model of real femurs, as signed distance fields for the generator.

The model is the femur of the LLP26 lower-limb PCA model (26 modes, built from CT of real lower limbs by the Auckland
Bioengineering Institute; ``musculoskeletal-models`` 0.2.4, https://github.com/musculoskeletal/models, Mozilla Public
License 2.0; Zhang J, Besier TF, "Accuracy of femur reconstruction from sparse geometric data using a statistical
shape model", Comput Methods Biomech Biomed Engin 2017;20:566-576). Its mean, first modes and surface were exported
once by :mod:`data_modules.synthetic.femur_ssm_export` into ``assets/femur_llp26.npz`` (MPL-2.0, licence beside it).

A subject's femur is the mean plus its mode weights times each mode's standard deviation, rigidly aligned back onto
the mean (the whole-limb model's modes also move the femur; that pose is not shape), and scaled about its head's
centre to the subject's head radius. Its landmarks (head sphere, shaft and neck axes, lesser trochanter) come from
fixed node sets, so they follow every instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

ASSET = Path(__file__).parent / "assets" / "femur_llp26.npz"
#: distances closer to the surface than this (mm) are exact, farther ones voxel-to-voxel (within ~0.5 mm): the
#: generator needs them exact across the cortex (< 5 mm) only
EXACT_BAND_MM = 5.5

Points = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points (rows): centre and radius."""
    a = np.c_[2.0 * points, np.ones(len(points))]
    solution = np.linalg.lstsq(a, (points ** 2).sum(axis=1), rcond=None)[0]
    centre = solution[:3]
    return centre, float(np.sqrt(solution[3] + centre @ centre))


def shaft_axis(points: np.ndarray) -> np.ndarray:
    """Unit direction of the line best fitting the points (the diaphysis's nodes), pointing distally (-z)."""
    direction = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)[2][0]
    return direction if direction[2] < 0 else -direction


@dataclass(frozen=True)
class FemurShape:
    """One left femur in body axes (RAS mm) with its head's centre at the origin."""

    vertices: np.ndarray  # (n, 3)
    triangles: np.ndarray  # (m, 3) vertex indices, outward normals by the right-hand rule
    head_radius: float
    shaft_dir: np.ndarray  # unit, distal
    shaft_point: np.ndarray  # a point on the shaft's axis (the diaphysis's centroid)
    neck_dir: np.ndarray  # unit, from the neck's centre towards the head's
    lesser: np.ndarray  # apex of the lesser trochanter

    @property
    def neck_shaft_angle(self) -> float:
        """Angle (deg) in 3D between the neck's axis (towards the head) and the shaft's (distally); adults ~120-135."""
        return float(np.degrees(np.arccos(np.clip(self.neck_dir @ self.shaft_dir, -1.0, 1.0))))

    @property
    def junction(self) -> np.ndarray:
        """Where the neck's axis (through the head's centre, the origin) passes closest to the shaft's axis."""
        b = self.neck_dir @ self.shaft_dir
        t = (self.shaft_dir @ self.shaft_point * b - self.neck_dir @ self.shaft_point) / (b * b - 1.0)
        return t * self.neck_dir


@lru_cache(maxsize=1)
def _model() -> dict[str, np.ndarray]:
    with np.load(ASSET) as data:
        return {key: data[key] for key in data.files}


def n_modes() -> int:
    """How many shape modes the asset holds."""
    return len(_model()["modes"])


def _align(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``x`` moved rigidly (rotation and translation, Kabsch) onto ``target`` (corresponding rows)."""
    cx, ct = x.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd((x - cx).T @ (target - ct))
    flip = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    return (x - cx) @ (u @ flip @ vt) + ct


def femur_instance(weights: Sequence[float], head_radius: float) -> FemurShape:
    """The femur with these mode weights (in standard deviations; fewer than the asset's modes leave the rest at 0)
    and this head radius (mm)."""
    model = _model()
    mean = model["mean"].astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)
    x = _align(mean + np.tensordot(w, model["modes"][: len(w)].astype(np.float64), axes=1), mean)
    centre, radius = fit_sphere(x[model["head_nodes"]])
    x = (x - centre) * (head_radius / radius)
    neck_centre = x[model["neck_nodes"]].mean(axis=0)
    return FemurShape(
        vertices=x,
        triangles=model["triangles"].astype(np.int64),
        head_radius=float(head_radius),
        shaft_dir=shaft_axis(x[model["diaphysis_nodes"]]),
        shaft_point=x[model["diaphysis_nodes"]].mean(axis=0),
        neck_dir=-neck_centre / np.linalg.norm(neck_centre),
        lesser=x[int(model["lesser_node"])],
    )


# ----------------------------------------------------------------------------- signed distance on a grid
def _inside(vertices: np.ndarray, triangles: np.ndarray, origin: np.ndarray, spacing: float,
            shape: tuple[int, int, int]) -> np.ndarray:
    """Voxels of the grid inside the closed surface: along each z column, the parity of the surface's crossings
    below each voxel."""
    crossings = np.zeros((shape[0], shape[1], shape[2] + 1), dtype=np.int32)
    for tri in vertices[triangles]:
        a, b, c = tri
        lo = np.maximum(np.ceil((tri[:, :2].min(axis=0) - origin[:2]) / spacing).astype(int), 0)
        hi = np.minimum(np.floor((tri[:, :2].max(axis=0) - origin[:2]) / spacing).astype(int) + 1, shape[:2])
        if np.any(hi <= lo):
            continue
        gx, gy = np.meshgrid(origin[0] + spacing * np.arange(lo[0], hi[0]), origin[1] + spacing * np.arange(lo[1], hi[1]),
                             indexing="ij")
        det = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])
        if det == 0.0:  # edge-on to the rays
            continue
        u = ((gx - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (gy - a[1])) / det
        v = ((b[0] - a[0]) * (gy - a[1]) - (gx - a[0]) * (b[1] - a[1])) / det
        hit = (u >= 0) & (v >= 0) & (u + v < 1)
        if not hit.any():
            continue
        z = a[2] + u[hit] * (b[2] - a[2]) + v[hit] * (c[2] - a[2])
        k = np.clip(np.ceil((z - origin[2]) / spacing).astype(int), 0, shape[2])
        ii, jj = np.nonzero(hit)
        np.add.at(crossings, (ii + lo[0], jj + lo[1], k), 1)
    return (np.cumsum(crossings[..., :-1], axis=2) % 2).astype(bool)


def _surface_samples(vertices: np.ndarray, triangles: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on every triangle on a barycentric lattice no coarser than ``step`` mm, and their triangles."""
    corners = vertices[triangles]
    edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2).max(axis=1)
    divisions = np.ceil(edges / step).astype(int)
    points, owners = [], []
    for n in np.unique(divisions):
        ids = np.flatnonzero(divisions == n)
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        bary = np.stack([1.0 - (i[keep] + j[keep]) / n, i[keep] / n, j[keep] / n], axis=1)
        points.append(np.einsum("pk,tkd->tpd", bary, corners[ids]).reshape(-1, 3))
        owners.append(np.repeat(ids, len(bary)))
    return np.concatenate(points), np.concatenate(owners)


def _unsigned_distance(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Distance (mm) from each point to the surface: exact where the foot of the perpendicular on the nearest
    sample's triangle lies inside it, else to the nearest of the dense surface samples (within ``step``)."""
    samples, owners = _surface_samples(vertices, triangles, step)
    nearest_dist, nearest = cKDTree(samples).query(points, workers=-1)
    a, b, c = (vertices[triangles[owners[nearest], k]] for k in range(3))
    normal = np.cross(b - a, c - a)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    height = np.einsum("nd,nd->n", points - a, normal)
    foot = points - height[:, None] * normal
    # barycentric coordinates of the foot
    v0, v1, v2 = b - a, c - a, foot - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = d00 * d11 - d01 * d01 + 1e-12
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    inside = (v >= 0) & (w >= 0) & (v + w <= 1)
    return np.where(inside, np.abs(height), nearest_dist)


@dataclass(frozen=True)
class DistanceGrid:
    """A signed distance field (mm, negative inside) on a regular grid, sampled trilinearly anywhere."""

    origin: np.ndarray  # position of voxel (0, 0, 0)
    spacing: float
    values: torch.Tensor  # (nx, ny, nz) float32

    def sample(self, p: Points) -> torch.Tensor:
        """The field at points ``p``; past the grid's faces, the value on the nearest face (positive: the grid
        holds the whole surface in x and y, and the surface continues past its z ends)."""
        size = torch.tensor(self.values.shape, dtype=torch.float32) - 1.0
        norm = [2.0 * (p[i] - float(self.origin[i])) / (self.spacing * float(size[i])) - 1.0 for i in range(3)]
        grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1).reshape(1, -1, 1, 1, 3)
        out = torch.nn.functional.grid_sample(self.values[None, None], grid, mode="bilinear", padding_mode="border",
                                              align_corners=True)
        return out.reshape(p[0].shape)


def distance_grid(femur: FemurShape, z_range: tuple[float, float], spacing: float = 1.0, margin: float = 6.0) -> DistanceGrid:
    """The femur's signed distance on a grid of ``spacing`` mm spanning ``z_range`` (mm, in the femur's frame) and
    its cross-section there plus ``margin``."""
    z_lo, z_hi = z_range
    part = femur.vertices[(femur.vertices[:, 2] >= z_lo - margin) & (femur.vertices[:, 2] <= z_hi + margin)]
    lo = np.r_[part[:, :2].min(axis=0) - margin, z_lo]
    hi = np.r_[part[:, :2].max(axis=0) + margin, z_hi]
    shape = tuple(int(np.ceil((hi[i] - lo[i]) / spacing)) + 1 for i in range(3))
    inside = _inside(femur.vertices, femur.triangles, lo, spacing, shape)
    # voxel-to-voxel distances everywhere (the surface half a voxel away), exact ones within ``EXACT_BAND_MM``
    distance = spacing * (np.where(inside, ndimage.distance_transform_edt(inside),
                                   ndimage.distance_transform_edt(~inside)) - 0.5)
    band = distance <= EXACT_BAND_MM
    axes = [lo[i] + spacing * np.arange(shape[i]) for i in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)[band]
    distance[band] = _unsigned_distance(points, femur.vertices, femur.triangles)
    values = np.where(inside, -distance, distance).astype(np.float32)
    return DistanceGrid(origin=lo, spacing=spacing, values=torch.from_numpy(values))
