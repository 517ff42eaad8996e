"""The synthetic subject: its parameters, its anatomy as signed distance fields, and its rendering in HU.

Each subject is a hip CT in Hounsfield units with the *left* proximal femur labelled, built from
signed distance fields (SDFs):

* left femur (labelled down to a cut 10 mm below the lesser trochanter's apex): since generator v4 a real femur's
  shape, drawn from the LLP26 statistical shape model (12 modes; :mod:`data_modules.synthetic.femur_shape`, MPL-2.0) and scaled
  to the subject's head radius; a thin cortex (0.3-0.5 mm over the head, 0.6-1.1 mm over the neck and trochanters)
  thickening to 3-5 mm in the shaft, around trabecular bone densest in the head and sparsest in the trochanteric
  region, and a fatty marrow canal in the shaft;
* distractors: both acetabula and the pelvis (primitives joined by smooth unions: ilium, pubis, ischium; sparser
  trabecular bone than the femoral neck and a 0.8-1.5 mm cortex) with a 1.5-3 mm joint space around each femoral
  head's fitted sphere (0.5-1.5 mm in osteoarthritic hips), and the right femur (the left one's mirror image), in
  view but **not** labelled;
* the surroundings of real pelvic CT (since generator v3, drawn from each subject's own random stream): the sacrum
  and the L5 vertebra (a 1 mm shell around ~150 HU trabecular bone), the bladder (urine 0-20 HU, filled to a varying
  size) above the pubis, bowel gas (a few air pockets, some in the rectum),
  the femoral and external iliac vessels (unenhanced blood ~40 HU in a fatty sheath) in front of each hip, and in ~10%
  of subjects metal in the *right* hip (a prosthesis or three cannulated screws) with streak artefacts;
* soft tissue (muscle, fattier with age) inside a subcutaneous fat ring, air outside;
* framing from hips only to the abdomen (L5) or the upper thigh: the field of view spans 160-260 mm along z, placed
  anywhere that keeps the labelled femur and the acetabulum in view;
* partial volume (each voxel covered by the share of it inside a tissue, then the slice profile), correlated noise
  and anisotropic voxels (default 1.0 x 1.0 x 2.5 mm).

Bone density follows published QCT values (HU ~ mg/cm3 hydroxyapatite; ``stvnet synth --report`` measures a cohort
against them, :mod:`data_modules.synthetic.realism`):

* trabecular bone of the femoral neck ~235 HU in men and ~205 HU in women at 55 years, falling ~2.0 and ~2.6 HU a
  year (Riggs BL et al., J Bone Miner Res 2004;19:1945-1954: trabecular vBMD falls ~45% over adult life in both
  sexes, faster in women after menopause); the head ~1.35x denser and the trochanteric region ~0.75x (this generator's
  assumption, after the head's dense principal compressive group and the sparse Ward's triangle);
* osteoporosis (prevalence rising with age, ~15-45% of women and ~5-20% of men of 55-85 years; Looker AC et al.,
  J Bone Miner Res 1997;12:1761-1768) removes 30% of trabecular density, 15% of cortical thickness and 80 HU of
  cortical density;
* cortical bone 1200-1500 HU before partial volume, falling 4 HU a year (porosity), shaft cortex 3-5 mm thinning
  0.6% a year, the neck's and trochanters' shell under 1.1 mm and the head's under 0.5 mm (Treece GM et al., Med Image Anal 2010;14:276-290;
  Poole KES et al., PLoS One 2012;7:e38466), so that at clinical resolution the thin shell peaks far below it;
* muscle ~50 HU at 55 falling ~0.8 HU a year with fat infiltration (Goodpaster BH et al., J Appl Physiol
  2000;89:104-110); subcutaneous fat ~-100 HU (Yoshizumi T et al., Radiology 1999;211:283-286);
* osteoarthritic narrowing of the joint space (0.5-1.5 mm) in 10-40% of hips, rising with age;
* vertebral trabecular bone ~150 HU at 55, lower with age and osteoporosis (QCT of the spine: 80-120 mg/cm3 is
  osteopenia, < 80 osteoporosis; ACR-SPR-SSR practice parameter for QCT, 2018), urine 0-20 HU (simple fluid -9 to
  20 HU: Silverman SG et al., Radiology 2019;292:475-488), unenhanced blood 35-45 HU (rising with the haematocrit:
  New PF, Aronow S, Radiology 1976;121:635-640), metal above the scanner's 3071 HU ceiling.

Men's femurs are larger (head diameter 48-50 mm vs 43-45 mm) and women's bone density lower on
average, so sex-stratified experiments have something to find. World coordinates are RAS+ mm; the
volumes are stored in LPS voxel order (as DICOM converters write them) so that canonical
reorientation is exercised. One seed gives a byte-identical cohort with the same library versions (others draw the
same subjects, but their files may differ in bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from data_modules.synthetic.femur_shape import DistanceGrid, FemurShape, distance_grid, femur_instance, n_modes

#: Field of view in RAS mm (x: patient right is +, y: anterior is +, z: superior is +); z is each subject's framing
#: (:func:`sample_surroundings`), here its hips-only extreme.
FOV_MM = ((-190.0, 120.0), (-85.0, 85.0), (-135.0, 50.0))
#: framing along z: a length in this range (mm), its ends anywhere between these limits that keep the label and the
#: acetabulum (-100 to 50 mm) in view
FOV_LENGTH_MM = (160.0, 260.0)
FOV_Z_LIMITS_MM = (-200.0, 160.0)
HIP_Z_MM = (-100.0, 50.0)


@dataclass(frozen=True)
class SubjectParams:
    """Anatomy, bone density and acquisition parameters of one synthetic subject.

    ``cortical_thickness`` is the shaft's cortex at the proximal-femur cut; the head, neck and trochanters carry a
    ``thin_cortex`` shell, the head a ``head_cortex`` one. ``trabecular_hu`` is the femoral neck's trabecular density; the head is denser and the
    trochanteric region sparser (:data:`HEAD_DENSITY`, :data:`TROCHANTER_DENSITY`). ``cortical_hu`` is the material
    density of compact bone before partial volume."""

    subject_id: str
    sex: str
    age: int
    osteoporotic: bool
    osteoarthritic: bool
    head_radius: float
    shape_modes: tuple[float, ...]
    cortical_thickness: float
    thin_cortex: float
    head_cortex: float
    cortical_hu: float
    trabecular_hu: float
    pelvis_hu: float
    pelvis_cortex: float
    muscle_hu: float
    fat_hu: float
    joint_space: float
    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    fov_jitter_mm: tuple[float, float, float]
    noise_hu: float
    seed: int


#: trabecular density of the femoral head and of the trochanteric region relative to the neck's
HEAD_DENSITY, TROCHANTER_DENSITY = 1.35, 0.75
#: the pelvis's compact bone relative to the femur's
PELVIS_CORTEX_DENSITY = 0.7


def sample_params(index: int, sex: str, rng: np.random.Generator) -> SubjectParams:
    """Draw one subject's anatomy and bone density from sex- and age-specific distributions (sources in the
    module docstring)."""
    male = sex == "M"
    head_radius = rng.uniform(24.0, 25.0) if male else rng.uniform(21.5, 22.5)
    age = int(rng.integers(55, 86))
    years = age - 55
    osteoporotic = bool(rng.random() < (0.05 + 0.005 * years if male else 0.15 + 0.01 * years))
    osteoarthritic = bool(rng.random() < 0.1 + 0.01 * years)
    loss = 0.7 if osteoporotic else 1.0
    trabecular = rng.normal(235.0 - 2.0 * years if male else 205.0 - 2.6 * years, 25.0) * loss
    return SubjectParams(
        subject_id=f"sub-{index:03d}",
        sex=sex,
        age=age,
        osteoporotic=osteoporotic,
        osteoarthritic=osteoarthritic,
        head_radius=float(head_radius),
        shape_modes=tuple(float(v) for v in np.clip(rng.standard_normal(n_modes()), -2.5, 2.5)),
        cortical_thickness=float(rng.uniform(3.5, 5.0) * (1.0 - 0.006 * years) * (0.85 if osteoporotic else 1.0)),
        thin_cortex=float(rng.uniform(0.6, 1.1)),
        head_cortex=float(rng.uniform(0.3, 0.5)),
        cortical_hu=float(rng.normal(1450.0 if male else 1380.0, 60.0) - 4.0 * years - (80.0 if osteoporotic else 0.0)),
        trabecular_hu=float(np.clip(trabecular, 60.0, 330.0)),
        pelvis_hu=float(np.clip(trabecular * rng.uniform(0.55, 0.8), 50.0, 250.0)),
        pelvis_cortex=float(rng.uniform(0.8, 1.5)),
        muscle_hu=float(rng.normal(50.0 - 0.8 * years, 6.0)),
        fat_hu=float(rng.normal(-100.0, 10.0)),
        joint_space=float(rng.uniform(0.5, 1.5) if osteoarthritic else rng.uniform(1.5, 3.0)),
        rotation_deg=tuple(float(v) for v in rng.uniform(-5.0, 5.0, size=3)),
        shift_mm=tuple(float(v) for v in rng.uniform(-5.0, 5.0, size=3)),
        fov_jitter_mm=tuple(float(v) for v in rng.uniform(-3.0, 3.0, size=3)),
        noise_hu=float(rng.uniform(20.0, 40.0)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


# ----------------------------------------------------------------------------- SDF primitives
# Points are a tuple of three float32 torch tensors (x, y, z), which keeps the arithmetic in float32
# and multi-threaded: a 4M-voxel subject renders in about a second on two cores.
Points = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _norm(dx: torch.Tensor, dy: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(dx * dx + dy * dy + dz * dz)


def _sphere(p: Points, c: np.ndarray, r: float) -> torch.Tensor:
    return _norm(p[0] - float(c[0]), p[1] - float(c[1]), p[2] - float(c[2])) - r


def _capsule(p: Points, a: np.ndarray, b: np.ndarray, r: float) -> torch.Tensor:
    ab = b - a
    pa = [p[i] - float(a[i]) for i in range(3)]
    t = ((pa[0] * float(ab[0]) + pa[1] * float(ab[1]) + pa[2] * float(ab[2])) / float(ab @ ab)).clamp_(0.0, 1.0)
    return _norm(pa[0] - t * float(ab[0]), pa[1] - t * float(ab[1]), pa[2] - t * float(ab[2])) - r


def _ellipsoid(p: Points, c: np.ndarray, radii: np.ndarray) -> torch.Tensor:
    """Approximate SDF of an axis-aligned ellipsoid (exact on the surface, good near it)."""
    q = [(p[i] - float(c[i])) / float(radii[i]) for i in range(3)]
    k0 = _norm(*q)
    k1 = _norm(*(q[i] / float(radii[i]) for i in range(3)))
    return k0 * (k0 - 1.0) / k1.clamp_min(1e-6)


def _smooth_union(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    h = (0.5 + 0.5 * (b - a) / k).clamp_(0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------- anatomy
def head_centre(prm: SubjectParams, side: float) -> np.ndarray:
    """Body coordinates (mm) of a femoral head's centre; ``side`` -1 for the left femur, +1 for the right."""
    return np.array([side * 90.0 * prm.head_radius / 23.0, 0.0, 0.0])


def to_world(prm: SubjectParams, body: np.ndarray) -> np.ndarray:
    """World (RAS mm) positions of body-coordinate points (rows): the subject's pose and shift applied, the inverse
    of the mapping :func:`anatomy` evaluates the anatomy with."""
    return np.asarray(body, dtype=float) @ _rotation(prm.rotation_deg).T + np.asarray(prm.shift_mm)


@dataclass(frozen=True)
class Femur:
    """Distance fields of one femur (mm, negative inside) and its bone-density fields on the same points."""

    sdf: torch.Tensor
    canal: torch.Tensor
    distal: torch.Tensor  # signed distance past the proximal-femur cut (> 0 distal)
    cortex_mm: torch.Tensor  # cortical thickness
    trabecular_hu: torch.Tensor  # trabecular density


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def femur_shape(prm: SubjectParams) -> FemurShape:
    """The subject's left femur from the statistical shape model (:mod:`data_modules.synthetic.femur_shape`); the right one is
    its mirror image."""
    return femur_instance(prm.shape_modes, prm.head_radius)


def _mirrored(v: np.ndarray) -> np.ndarray:
    """A left-femur vector (body axes) for the right femur: x mirrored."""
    return v * np.array([-1.0, 1.0, 1.0])


def _femur_sdf(p: Points, prm: SubjectParams, side: float, shape: FemurShape, grid: DistanceGrid) -> Femur:
    """One femur: its SDF (the shape model's surface, ``grid``), its medullary canal's, the half-space distal to the
    proximal-femur cut, and its density.

    The proximal femur (what is labelled) ends at a plane across the shaft 10 mm (scaled) below the lesser
    trochanter's apex, as QCT hip analyses define it; the shaft continues in the image beyond that plane. The cortex
    is a shell of ``head_cortex`` over the head (the subchondral plate), ``thin_cortex`` over the neck and
    trochanters, and thickens below the lesser trochanter to the shaft's ``cortical_thickness`` 25 mm further down;
    the fatty marrow canal starts 13 mm (scaled) below the lesser trochanter, 3 mm inside the shaft's cortex;
    trabecular bone is densest in the head (principal compressive group) and sparsest in the trochanteric region
    (Ward's triangle).

    ``p`` are body coordinates; ``side`` is -1 for the left femur (patient's left is -x in RAS) and +1
    for the right one, which is the mirror image.
    """
    head = head_centre(prm, side)
    # the left femur's frame: head centre at the origin, x mirrored for the right femur
    q = ((p[0] - float(head[0])) * (1.0 if side < 0 else -1.0), p[1] - float(head[1]), p[2] - float(head[2]))
    s = prm.head_radius / 23.0
    d = grid.sample(q)
    along = sum((q[i] - float(shape.lesser[i])) * float(shape.shaft_dir[i]) for i in range(3))  # mm below the apex
    distal = along - 10.0 * s
    canal = torch.maximum(d + (prm.cortical_thickness + 3.0), 13.0 * s - along)
    below_lesser = _smoothstep(along / 25.0)
    cortex = prm.thin_cortex + (prm.cortical_thickness - prm.thin_cortex) * below_lesser
    from_head = _norm(*q)
    cortex = torch.lerp(cortex, torch.full_like(cortex, prm.head_cortex), torch.sigmoid((prm.head_radius + 4.0 - from_head) / 2.0))
    in_head = torch.sigmoid((prm.head_radius - from_head) / 8.0)
    density = TROCHANTER_DENSITY + (HEAD_DENSITY - TROCHANTER_DENSITY) * in_head
    return Femur(d, canal, distal, cortex, prm.trabecular_hu * density)


def _pelvis_sdf(p: Points, prm: SubjectParams) -> torch.Tensor:
    """SDF of both acetabula with the iliac wings, pubic and ischial rami (never labelled)."""
    d = torch.full_like(p[0], float("inf"))
    s = prm.head_radius / 23.0
    cup_in = prm.head_radius + prm.joint_space
    for side in (-1.0, 1.0):
        head = np.array([side * 90.0 * s, 0.0, 0.0])
        medial = -side
        # acetabular cup: a shell around the head, open towards lateral-inferior
        centre_dist = _sphere(p, head, 0.0)
        shell = torch.maximum(centre_dist - (cup_in + 9.0), cup_in - centre_dist)
        opening = _unit(np.array([-medial * 0.75, 0.1, -0.66]))
        # keep the part of the shell away from the lateral-inferior opening
        cut = sum((p[i] - float(head[i])) * float(opening[i]) for i in range(3)) - 0.25 * prm.head_radius
        cup = torch.maximum(shell, cut)
        ilium_a = head + np.array([medial * 8.0, -5.0, 30.0]) * s
        ilium_b = head + np.array([-medial * 25.0, -20.0, 95.0]) * s
        ilium = _capsule(p, ilium_a, ilium_b, 14.0 * s)
        pubis = _capsule(p, head + np.array([medial * 25.0, 20.0, -15.0]) * s,
                         np.array([side * 8.0, 45.0 * s, -35.0 * s]), 8.0 * s)
        ischium = _capsule(p, head + np.array([medial * 12.0, -25.0, -30.0]) * s,
                           head + np.array([medial * 30.0, -30.0, -65.0]) * s, 10.0 * s)
        d = torch.minimum(d, _smooth_union(_smooth_union(cup, ilium, 6.0), _smooth_union(pubis, ischium, 6.0), 6.0))
    return d


@dataclass(frozen=True)
class Surroundings:
    """What surrounds the hips, and the framing: drawn by :func:`sample_surroundings` from the subject's own random
    stream (added in generator v3 without changing the other parameters' draws).

    Positions are body coordinates (mm): x towards the patient's right, y anterior, z superior, the femoral heads'
    centres at z = 0."""

    fov_z_mm: tuple[float, float]
    spine_hu: float
    bladder_centre: tuple[float, float, float]
    bladder_radii: tuple[float, float, float]
    bladder_hu: float
    gas: tuple[tuple[float, float, float, float], ...]  # (x, y, z, radius) of each air pocket
    blood_hu: float
    metal: str


def sample_surroundings(prm: SubjectParams) -> Surroundings:
    """The subject's spine density, bladder, bowel gas, blood, metal and framing (sources in the module docstring)."""
    rng = np.random.default_rng([prm.seed, 2])
    length = float(rng.uniform(*FOV_LENGTH_MM))
    low = float(rng.uniform(max(FOV_Z_LIMITS_MM[0], HIP_Z_MM[1] - length), HIP_Z_MM[0]))
    spine = rng.uniform(0.55, 0.75) * prm.trabecular_hu
    radii = (float(rng.uniform(25.0, 45.0)), float(rng.uniform(18.0, 35.0)), float(rng.uniform(12.0, 35.0)))
    bladder = (float(rng.uniform(-5.0, 5.0)), float(rng.uniform(10.0, 20.0)), -22.0 + radii[2])
    pockets: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 7))):
        rectum = rng.random() < 0.3
        centre = (np.array([rng.uniform(-8.0, 8.0), rng.uniform(-75.0, -60.0), rng.uniform(-10.0, 30.0)]) if rectum
                  else np.array([rng.uniform(-60.0, 60.0), rng.uniform(-30.0, 50.0), rng.uniform(30.0, 140.0)]))
        radius = float(rng.uniform(4.0, 8.0) if rectum else rng.uniform(5.0, 18.0))
        inside_bladder = np.linalg.norm((centre - bladder) / (np.array(radii) + radius)) < 1.0
        if not inside_bladder:
            pockets.append((*(float(v) for v in centre), radius))
    draw = rng.random()
    metal = "prosthesis" if draw < 0.05 else "screws" if draw < 0.10 else "none"
    return Surroundings(
        fov_z_mm=(low, low + length),
        spine_hu=float(np.clip(spine, 50.0, 250.0)),
        bladder_centre=bladder,
        bladder_radii=radii,
        bladder_hu=float(rng.uniform(0.0, 20.0)),
        gas=tuple(pockets),
        blood_hu=float(rng.uniform(35.0, 45.0)),
        metal=metal,
    )


def _spine_sdf(p: Points) -> torch.Tensor:
    """SDF of the sacrum (alae, the tilted body tapering to the coccyx) and the L5 vertebra (body, transverse and
    spinous processes), the disc between them left as soft tissue."""
    sacrum = _ellipsoid(p, np.array([0.0, -55.0, 82.0]), np.array([52.0, 20.0, 16.0]))
    sacrum = _smooth_union(sacrum, _capsule(p, np.array([0.0, -52.0, 80.0]), np.array([0.0, -82.0, 20.0]), 16.0), 8.0)
    sacrum = _smooth_union(sacrum, _capsule(p, np.array([0.0, -82.0, 20.0]), np.array([0.0, -78.0, -8.0]), 6.0), 4.0)
    body = _ellipsoid(p, np.array([0.0, -38.0, 122.0]), np.array([26.0, 18.0, 13.0]))
    processes = torch.minimum(_capsule(p, np.array([-42.0, -52.0, 124.0]), np.array([42.0, -52.0, 124.0]), 6.0),
                              _capsule(p, np.array([0.0, -55.0, 124.0]), np.array([0.0, -92.0, 116.0]), 6.0))
    return torch.minimum(sacrum, _smooth_union(body, processes, 5.0))


def _vessels_sdf(p: Points, side: float) -> torch.Tensor:
    """SDF of one side's external iliac and femoral artery and vein (the vein medial), in front of the hip."""
    path = [np.array([side * x, y, z]) for x, y, z in ((45.0, 5.0, 95.0), (68.0, 28.0, 25.0), (78.0, 38.0, -30.0),
                                                      (76.0, 30.0, -210.0))]
    medial = np.array([-side * 11.0, 0.0, 0.0])
    d = torch.full_like(p[0], float("inf"))
    for a, b in zip(path[:-1], path[1:]):
        d = torch.minimum(d, _capsule(p, a, b, 4.0))  # artery
        d = torch.minimum(d, _capsule(p, a + medial, b + medial, 6.0))  # vein
    return d


def _metal_sdf(p: Points, prm: SubjectParams, kind: str, shape: FemurShape) -> torch.Tensor:
    """SDF of the metal in the right hip: a prosthesis (head, neck, stem down the shaft) or three cannulated screws
    across the neck."""
    head = head_centre(prm, side=1.0)
    neck_dir, shaft_dir = _mirrored(shape.neck_dir), _mirrored(shape.shaft_dir)
    junction = head + _mirrored(shape.junction)
    if kind == "prosthesis":
        d = _sphere(p, head, prm.head_radius - 0.5)
        d = torch.minimum(d, _capsule(p, head, junction, 7.0))
        return torch.minimum(d, _capsule(p, junction, junction + 130.0 * shaft_dir, 6.0))
    d = torch.full_like(p[0], float("inf"))
    for dy, dz in ((0.0, -8.0), (-7.0, 6.0), (7.0, 6.0)):
        offset = np.array([0.0, dy, dz]) * prm.head_radius / 23.0
        tip = head + offset + 0.5 * prm.head_radius * neck_dir  # short of the subchondral bone
        d = torch.minimum(d, _capsule(p, junction - 25.0 * neck_dir + offset, tip, 3.2))
    return d


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def distance_grid_spacing(spacing: Sequence[float]) -> float:
    """The femur's distance grid spacing (mm) for a render at voxel ``spacing``: half the finest voxel, between 1 and
    2 mm. Every scan at 2 mm or finer (the default cohort, the clinical preset) gets the 1 mm grid; a coarse render
    (the tests' 3 x 3 x 4 mm) a coarser one, 3-4x cheaper, its trilinear error still well inside one voxel."""
    return float(np.clip(min(abs(s) for s in spacing) / 2.0, 1.0, 2.0))


def anatomy(prm: SubjectParams, spacing: tuple[float, float, float], origin: Sequence[float] | None = None,
            shape: Sequence[int] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Signed distance fields (mm, negative inside) of every structure on the subject's voxel grid, and the
    grid's affine. Keys: ``left``, ``left_canal``, ``right``, ``right_canal``, ``pelvis``, ``label`` (the left
    proximal femur: the left femur above the shaft cut), ``skin`` (a normalised radius, < 1 inside the body), and
    each femur's density fields ``left_cortex`` / ``right_cortex`` (cortical thickness, mm) and ``left_trabecular`` /
    ``right_trabecular`` (trabecular HU), and the surroundings (:class:`Surroundings`): ``spine``, ``bladder``,
    ``gas``, ``vessels`` and, with metal in the right hip, ``metal``. The femurs are cut away where they would meet
    the pelvis (and a prosthesis replaces the right femur's head and neck), so bones never overlap; soft structures
    are painted under the bones. The grid starts at ``origin`` (RAS mm of voxel 0) with ``shape`` voxels; by default
    it is the subject's field of view (:data:`FOV_MM` across, the subject's framing along z, jittered)."""
    around = sample_surroundings(prm)
    if origin is None or shape is None:
        frame = (FOV_MM[0], FOV_MM[1], around.fov_z_mm)
        lo = np.array([frame[i][0] + prm.fov_jitter_mm[i] for i in range(3)])
        hi = np.array([frame[i][1] + prm.fov_jitter_mm[i] for i in range(3)])
        shape = tuple(int(round((hi[i] - lo[i]) / spacing[i])) for i in range(3))
        origin = (hi[0], hi[1], lo[2])
    # LPS voxel order: i runs towards patient left (-x), j towards posterior (-y), k towards superior.
    axes = (origin[0] - spacing[0] * np.arange(shape[0]), origin[1] - spacing[1] * np.arange(shape[1]),
            origin[2] + spacing[2] * np.arange(shape[2]))
    world = torch.meshgrid(*(torch.from_numpy((v - prm.shift_mm[i]).astype(np.float32)) for i, v in enumerate(axes)), indexing="ij")
    rot = _rotation(prm.rotation_deg)
    # world -> body coordinates (row vector times rotation)
    body = tuple(sum(world[r] * float(rot[r, c]) for r in range(3)) for c in range(3))
    del world
    with torch.no_grad():
        shape = femur_shape(prm)
        # the femur's distance field down to the lowest point in view (both femurs share it)
        bottom = float(min(body[2].min(), 0.0)) - 2.0
        grid = distance_grid(shape, (max(bottom, float(shape.vertices[:, 2].min())), prm.head_radius + 8.0),
                             spacing=distance_grid_spacing(spacing))
        pelvis = _pelvis_sdf(body, prm)
        sdfs = {"pelvis": pelvis.numpy(), "spine": _spine_sdf(body).numpy()}
        resected = None
        if around.metal != "none":
            sdfs["metal"] = _metal_sdf(body, prm, around.metal, shape).numpy()
        if around.metal == "prosthesis":
            head = head_centre(prm, side=1.0)
            resected = _sphere(body, head, prm.head_radius + 1.0)
        for name, side in (("left", -1.0), ("right", 1.0)):
            femur = _femur_sdf(body, prm, side, shape, grid)
            sdf = torch.maximum(femur.sdf, -pelvis)  # CSG difference: femur minus pelvis
            if name == "right" and resected is not None:
                sdf = torch.maximum(sdf, -resected)
            sdfs[name] = sdf.numpy()
            sdfs[f"{name}_canal"] = femur.canal.numpy()
            sdfs[f"{name}_cortex"] = femur.cortex_mm.numpy()
            sdfs[f"{name}_trabecular"] = femur.trabecular_hu.numpy()
            if name == "left":
                sdfs["label"] = torch.maximum(sdf, femur.distal).numpy()  # the proximal part only
        sdfs["skin"] = torch.sqrt((body[0] / 175.0) ** 2 + (body[1] / 125.0) ** 2).numpy()
        sdfs["bladder"] = _ellipsoid(body, np.array(around.bladder_centre), np.array(around.bladder_radii)).numpy()
        gas = torch.full_like(body[0], float("inf"))
        for x, y, z, r in around.gas:
            gas = torch.minimum(gas, _ellipsoid(body, np.array([x, y, z]), np.array([r, 0.8 * r, 1.3 * r])))
        sdfs["gas"] = gas.numpy()
        sdfs["vessels"] = torch.minimum(_vessels_sdf(body, -1.0), _vessels_sdf(body, 1.0)).numpy()
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return sdfs, affine


def render_subject(prm: SubjectParams, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one subject: returns (HU image int16, label uint8, affine) in LPS voxel order."""
    sdfs, affine = anatomy(prm, spacing)
    image, label = intensities(sdfs, prm, spacing, np.random.default_rng(prm.seed))
    return image, label, affine


def coverage(sdf: np.ndarray, extent: np.ndarray | float) -> np.ndarray:
    """Share of a voxel inside a surface, from the signed distance of its centre and the voxel's extent along the
    surface's normal (the surface taken as flat across the voxel)."""
    return np.clip(0.5 - sdf / extent, 0.0, 1.0)


def normal_extent(sdf: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Each voxel's extent (mm) along the normal of the distance field's level set through it: its thickness as the
    surface sees it, e.g. the slice thickness for a surface parallel to the slices, the pixel size across them."""
    grads = np.gradient(sdf, *spacing)
    norm = np.sqrt(sum(g * g for g in grads)) + 1e-6
    # no thinner than the voxel's smallest side (where a field is flat, e.g. past the edge of a sampled one)
    return np.maximum(sum(np.abs(g) * (s / norm) for g, s in zip(grads, spacing)), min(spacing))


def _bounds(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box of slices holding every true voxel of ``mask`` (grown by one voxel for gradients)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, hit[0] - 1), hit[-1] + 2) if hit.size else slice(0, 0))
    return tuple(box)


#: HU of implant metal before the scanner's ceiling (3071) clips it
METAL_HU = 8000.0


def _paint(hu: np.ndarray, sdf: np.ndarray, value: np.ndarray | np.float32 | float, spacing: Sequence[float]) -> None:
    """Fill a structure into ``hu`` in place with partial volume: each voxel takes ``value`` (a number, or a field on
    the whole grid) by the share of it inside the surface."""
    reach = 0.5 * float(np.linalg.norm(spacing))
    box = _bounds(sdf < reach)
    near = sdf[box] < reach
    if not near.any():
        return
    extent = normal_extent(sdf[box], spacing)[near]
    target = value[box][near] if isinstance(value, np.ndarray) and value.ndim else value
    voxels = hu[box][near]
    voxels += coverage(sdf[box][near], extent) * (target - voxels)
    hu[box][near] = voxels


def _streaks(metal: np.ndarray, spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Streak artefacts of metal (HU to add): in each axial slice through metal, bright and dark rays from the metal's
    centre at a dozen angles, fading with distance and growing with the metal's cross-section."""
    out = np.zeros(metal.shape, dtype=np.float32)
    angles = rng.uniform(0.0, np.pi, 12)
    amplitudes = rng.choice([-1.0, 1.0], 12) * rng.uniform(150.0, 400.0, 12)
    x = np.arange(metal.shape[0], dtype=np.float32)[:, None] * spacing[0]
    y = np.arange(metal.shape[1], dtype=np.float32)[None, :] * spacing[1]
    for k in np.flatnonzero(metal.any(axis=(0, 1))):
        ii, jj = np.nonzero(metal[:, :, k])
        cx, cy = ii.mean() * spacing[0], jj.mean() * spacing[1]
        theta = np.arctan2(y - cy, x - cx)
        radius = np.hypot(x - cx, y - cy)
        strength = min(1.0, ii.size * spacing[0] * spacing[1] / 100.0)  # a 100 mm2 cross-section streaks fully
        rays = sum(a * np.exp(-0.5 * (np.angle(np.exp(2j * (theta - t))) / 0.04) ** 2)
                   for a, t in zip(amplitudes, angles))
        out[:, :, k] = strength * rays / (1.0 + radius / 60.0)
    return out


def intensities(sdfs: dict[str, np.ndarray], prm: SubjectParams, spacing: Sequence[float], rng: np.random.Generator,
                 phantom: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HU image (int16) and label (uint8) from the distance fields: tissues, bone, optional calibration phantom
    (``phantom``: HU per voxel, NaN outside it), partial volume and correlated noise."""
    skin = sdfs["skin"]
    shape = skin.shape

    sigma_vox = tuple(s for s in (1.5 / spacing[0], 1.5 / spacing[1], 1.5 / spacing[2]))
    texture = _smooth_noise(rng, shape, sigma_vox)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[skin < 1.0] = prm.fat_hu  # subcutaneous fat
    muscle = skin < 0.86
    hu[muscle] = prm.muscle_hu + 8.0 * texture[muscle]
    around = sample_surroundings(prm)
    # soft structures under the bones: the vessels' fatty sheath, blood, urine, bowel gas
    _paint(hu, sdfs["vessels"] - 5.0, prm.fat_hu + 10.0 * texture, spacing)
    _paint(hu, sdfs["vessels"], around.blood_hu + 4.0 * texture, spacing)
    _paint(hu, sdfs["bladder"], around.bladder_hu + 3.0 * texture, spacing)
    _paint(hu, sdfs["gas"], np.float32(-1000.0), spacing)
    # bone by partial volume: each layer (bone as cortex, its trabecular core, the marrow canal) covers a voxel by the
    # share of it that lies inside, from the distance fields and the voxel's extent across the surface, so a
    # sub-millimetre cortex shows as a faint shell and a thick slice averages what it spans
    reach = 0.5 * float(np.linalg.norm(spacing))  # voxels farther outside a surface than this hold none of it
    for name in ("left", "right", "pelvis", "spine"):
        box = _bounds(sdfs[name] < reach)
        near = sdfs[name][box] < reach
        if not near.any():  # the structure lies outside this field of view
            continue
        extent = normal_extent(sdfs[name][box], spacing)[near]
        sdf, tex = sdfs[name][box][near], texture[box][near]
        if name == "pelvis":
            cortex, trabecular, canal = np.float32(prm.pelvis_cortex), prm.pelvis_hu + 50.0 * tex, None
        elif name == "spine":
            cortex, trabecular, canal = np.float32(1.0), around.spine_hu + 40.0 * tex, None
        else:
            cortex, trabecular = sdfs[f"{name}_cortex"][box][near], sdfs[f"{name}_trabecular"][box][near]
            trabecular = trabecular * (1.0 + 0.25 * tex)
            canal = sdfs[f"{name}_canal"][box]
            canal = coverage(canal, normal_extent(canal, spacing))[near]
        voxels = hu[box][near]
        compact = prm.cortical_hu * (PELVIS_CORTEX_DENSITY if name in ("pelvis", "spine") else 1.0)
        voxels += coverage(sdf, extent) * (compact + 60.0 * tex - voxels)
        core = coverage(sdf + cortex, extent)
        voxels += core * (trabecular - voxels)
        if canal is not None:  # fatty marrow of the elderly
            voxels += core * canal * (-30.0 + 15.0 * tex - voxels)
        hu[box][near] = voxels
    if phantom is not None:
        inside = np.isfinite(phantom)
        hu[inside] = phantom[inside]

    if "metal" in sdfs:
        _paint(hu, sdfs["metal"], np.float32(METAL_HU), spacing)

    # the point spread function (wider along the thick axis), metal's streaks, then correlated noise
    hu = ndimage.gaussian_filter(hu, (0.6, 0.6, 0.45))
    if "metal" in sdfs:
        hu += _streaks(sdfs["metal"] < 0.0, spacing, np.random.default_rng([prm.seed, 3]))
    hu += prm.noise_hu * _smooth_noise(rng, shape, (0.6, 0.6, 0.3))
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    label = (sdfs["label"] < 0.0).astype(np.uint8)
    return image, label
