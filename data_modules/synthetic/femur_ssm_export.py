"""Export the left femur of the LLP26 shape model into this project's small asset (run once, by a developer).

``python -m data_modules.synthetic.femur_ssm_export <folder with musculoskeletal/models>`` reads, from an unpacked
``musculoskeletal-models`` 0.2.4 wheel (``pip download --no-deps musculoskeletal-models==0.2.4``, MPL-2.0, Auckland
Bioengineering Institute), the lower-limb PCA model ``shape_models/LLP26_rigid.pc`` (a plain pickle: ``mean`` and
``modes`` over pelvis, femur, patella and tibia points, coordinates blocked x then y then z; ``weights`` the modes'
variances) and the femur's quartic Lagrange mesh (``atlas_meshes/femur_left_quartic_flat.mesh`` / ``.ens``, mean
``femur_left_mean_rigid_LLP26.geof``), and writes :data:`data_modules.synthetic.femur_shape.ASSET`:

* ``mean`` (634 x 3) and ``modes`` (k x 634 x 3, each one standard deviation of the mode) of the femur's nodes, in
  RAS mm (the model's frame is LPS: x and y negated);
* ``triangles``: each element split along its node lattice (a 5 x 5 quad into 32 triangles, a 15-node triangle into
  16), a closed, consistently oriented surface through the nodes;
* landmark node sets picked on the mean: the head's nodes (within 1.5 mm of its fitted sphere), the diaphysis's
  (120-300 mm below the head's centre), the neck's (a ring 4-12 mm outside the head, lateral of its centre) and the
  lesser trochanter's apex (the most posteromedial node 35-75 mm below the head's centre).

Nothing reads the wheel at run time; the asset and its licence travel with the code (``data_modules/synthetic/assets``).
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from data_modules.synthetic.femur_shape import ASSET, fit_sphere, shaft_axis

#: the femur's rows in LLP26's point list (pelvis first), found by matching the femur mean mesh's nodes
FEMUR_POINTS = slice(1946, 2580)
N_MODES = 12
NODES_PER_ELEMENT = {"quad55": 25, "quad54": 20, "tri15": 15}


def _lattice_triangles(kind: str) -> list[tuple[int, int, int]]:
    """Split one element's node lattice into triangles (local node numbers, first index fastest)."""
    out: list[tuple[int, int, int]] = []
    if kind.startswith("quad"):
        nu, nv = 5, int(kind[-1])
        for j in range(nv - 1):
            for i in range(nu - 1):
                a, b, c, d = j * nu + i, j * nu + i + 1, (j + 1) * nu + i, (j + 1) * nu + i + 1
                out += [(a, b, d), (a, d, c)]
        return out
    index, k = {}, 0
    for j in range(5):
        for i in range(5 - j):
            index[i, j], k = k, k + 1
    for j in range(4):
        for i in range(4 - j):
            out.append((index[i, j], index[i + 1, j], index[i, j + 1]))
            if i + j + 2 <= 4:
                out.append((index[i + 1, j], index[i + 1, j + 1], index[i, j + 1]))
    return out


def _element_nodes(mesh: dict) -> tuple[list[str], list[list[int]]]:
    """Each element's kind and global node numbers: nodes shared between elements (the mesh's connectivity map)
    are merged, then numbered in order of first appearance, element by element (as GIAS3's fieldwork does)."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(a: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    for key, shared in mesh["connectivity"].items():
        a = tuple(int(v) for v in key.split("_"))
        for other in shared.split():
            parent[root(a)] = root(tuple(int(v) for v in other.split("_")))
    kinds = [mesh["elements"][str(e)].split()[1] for e in range(mesh["element_counter"])]
    number: dict[tuple[int, int], int] = {}
    nodes = []
    for e, kind in enumerate(kinds):
        row = []
        for local in range(NODES_PER_ELEMENT[kind]):
            row.append(number.setdefault(root((e, local)), len(number)))
        nodes.append(row)
    return kinds, nodes


def export(models: Path, out: Path = ASSET) -> None:
    models = Path(models) / "musculoskeletal" / "models"
    with open(models / "shape_models" / "LLP26_rigid.pc", "rb") as f:
        pc = pickle.load(f, encoding="latin1")
    to_ras = np.array([-1.0, -1.0, 1.0])
    mean = pc["mean"].reshape(3, -1).T[FEMUR_POINTS] * to_ras
    modes = np.stack([pc["modes"][:, i].reshape(3, -1).T[FEMUR_POINTS] * np.sqrt(pc["weights"][i]) * to_ras
                      for i in range(N_MODES)])
    atlas = models / "atlas_meshes"
    geof = json.loads((atlas / "femur_left_mean_rigid_LLP26.geof").read_text())["field_parameters"]
    nodes_xyz = np.array([[float(geof[f"node {i:08d}"][f"dim {d}"]) for d in range(3)] for i in range(len(mean))])
    if not np.allclose(nodes_xyz * to_ras, mean):
        raise ValueError("the femur rows of LLP26_rigid.pc do not match the femur mean mesh")
    kinds, element_nodes = _element_nodes(json.loads((atlas / "femur_left_quartic_flat.mesh").read_text()))
    triangles = np.array([[nodes[a], nodes[b], nodes[c]] for kind, nodes in zip(kinds, element_nodes)
                          for a, b, c in _lattice_triangles(kind)], dtype=np.int16)

    centre, radius = fit_sphere(mean[mean[:, 2] > mean[:, 2].max() - 15.0])
    for _ in range(5):
        head = np.flatnonzero(np.abs(np.linalg.norm(mean - centre, axis=1) - radius) < 1.5)
        centre, radius = fit_sphere(mean[head])
    below = centre[2] - mean[:, 2]
    diaphysis = np.flatnonzero((below > 120.0) & (below < 300.0))
    shaft = shaft_axis(mean[diaphysis])
    distance = np.linalg.norm(mean - centre, axis=1)
    medial = 1.0  # the left femur's midline side is +x in RAS
    neck = np.flatnonzero((distance > radius + 4.0) & (distance < radius + 12.0) & (medial * (mean[:, 0] - centre[0]) < 0))
    near_lesser = np.flatnonzero((below > 35.0) & (below < 75.0))
    towards = np.array([0.5 * medial, -0.85, 0.0])  # posteromedial
    lesser = int(near_lesser[np.argmax((mean[near_lesser] - centre) @ towards)])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, mean=mean.astype(np.float32), modes=modes.astype(np.float32), triangles=triangles,
                        head_nodes=head.astype(np.int16), diaphysis_nodes=diaphysis.astype(np.int16),
                        neck_nodes=neck.astype(np.int16), lesser_node=np.int16(lesser))
    print(f"{out}: {len(mean)} nodes, {len(triangles)} triangles, {N_MODES} modes; head r = {radius:.1f} mm "
          f"({len(head)} nodes), shaft {np.round(shaft, 3)}, neck ring {len(neck)} nodes, lesser node {lesser}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="folder holding musculoskeletal/models (an unpacked wheel)")
    parser.add_argument("--out", type=Path, default=ASSET)
    args = parser.parse_args()
    export(args.models, args.out)


if __name__ == "__main__":
    main()
