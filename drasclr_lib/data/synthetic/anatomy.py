"""Anatomy of the synthetic chest: implicit shapes in a template frame, and branching trees.

Every shape is an implicit function of *template* coordinates ``(X, Y, Z)`` in millimetres of an
adult template chest: ``X`` towards the subject's right, ``Y`` anterior, ``Z`` superior, origin on
the midline at the level of the lowest lung point. A subject is the template scaled per axis
(body size, inspiration), rotated and shifted (:class:`Geometry`), so the same functions serve the
voxel grid (arrays of any shape) and point clouds (1-D arrays) used to grow the trees.

Template landmarks (adult, mm): thoracic cavity a super-ellipse of half-axes 128 x 90; lungs from
``Z = 10`` (posterior costophrenic recess) to ``Z ~ 250`` (apex); carina at ``Z = 165``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry", "TEMPLATE", "lung_side", "lobe_of", "cavity_distance", "grow_tree", "sample_lung_points",
           "subpleural_points"]

# Template constants (adult, mm)
TEMPLATE = {
    "cavity_a": 128.0,  # half-width of the thoracic cavity
    "cavity_b": 90.0,  # half-depth (AP)
    "cavity_p": 2.4,  # super-ellipse exponent (a boxy torso)
    "wall": 16.0,  # muscle + ribs between cavity and subcutaneous fat
    "skin": 2.0,
    "med_x": -6.0,  # centre of the mediastinal band (slightly left)
    "med_w": 22.0,  # its half-width
    "spine_y": -70.0,  # centre of the vertebral body
    "spine_r": 18.0,
    "lung_top": 250.0,
    "carina": (0.0, -20.0, 165.0),
    "heart_c": (-26.0, 36.0, 66.0),
    "heart_r": (56.0, 46.0, 52.0),
}


@dataclass(frozen=True)
class Geometry:
    """Per-subject placement of the template: scales, rotation and shift.

    World (scanner RAS, mm) from template: ``w = R @ (scale * T) + shift``.

    Attributes:
        scale: overall size factor (1.0 = adult template).
        bx, by, hz: per-axis factors for width, depth and height (body habitus, inspiration).
        fat: subcutaneous fat thickness in template mm.
        rotation: (3, 3) rotation matrix (small angles).
        shift: (3,) translation in mm.
        dome_r, dome_l: heights of the right and left diaphragm domes (template mm).
        fissure_dz: vertical shift of the fissures (template mm).
    """

    scale: float
    bx: float
    by: float
    hz: float
    fat: float
    rotation: np.ndarray
    shift: np.ndarray
    dome_r: float
    dome_l: float
    fissure_dz: float

    @property
    def axis_scale(self) -> np.ndarray:
        """(3,) template-mm to world-mm factors per axis."""
        return self.scale * np.array([self.bx, self.by, self.hz])

    def to_template(self, x, y, z):
        """World coordinates (broadcastable arrays, mm) -> template coordinates (float32 arrays)."""
        r, t, s = self.rotation, self.shift, self.axis_scale
        dx, dy, dz = x - t[0], y - t[1], z - t[2]
        # anat = R^T (w - t); template = anat / s
        X = ((r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / s[0]).astype(np.float32)
        Y = ((r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / s[1]).astype(np.float32)
        Z = ((r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / s[2]).astype(np.float32)
        return X, Y, Z

    def to_world(self, pts: np.ndarray) -> np.ndarray:
        """Template points (N, 3) -> world points (N, 3)."""
        return (np.asarray(pts) * self.axis_scale) @ self.rotation.T + self.shift

    @property
    def radius_scale(self) -> float:
        """Factor for radii of tubes (mean in-plane scale)."""
        return float(self.scale * 0.5 * (self.bx + self.by))


def cavity_distance(X, Y):
    """Approximate signed distance (template mm) to the thoracic cavity wall; negative inside."""
    a, b, p = TEMPLATE["cavity_a"], TEMPLATE["cavity_b"], TEMPLATE["cavity_p"]
    ax, ay = np.abs(X) / a, np.abs(Y) / b
    norm = (ax**p + ay**p) ** (1.0 / p)  # homogeneous of degree 1
    radial = np.sqrt(X * X + Y * Y)
    return radial * (1.0 - 1.0 / np.maximum(norm, 1e-6))


def diaphragm_z(X, Y, g: Geometry):
    """Height (template Z) of the diaphragm under each point: two domes over a sloping base."""
    base = 10.0 + 0.22 * (Y + 90.0)  # the posterior recesses are lowest
    right = g.dome_r * np.exp(-((X - 62.0) ** 2 + (Y - 5.0) ** 2) / (2 * 48.0**2))
    left = g.dome_l * np.exp(-((X + 62.0) ** 2 + (Y - 5.0) ** 2) / (2 * 48.0**2))
    return base + right + left


def lung_side(X, Y, Z, g: Geometry, cavity_d=None):
    """Which lung a template point lies in: 0 none, 1 right, 2 left (uint8, shape of X).

    The lungs are the thoracic cavity above the diaphragm and below the apical dome, minus the
    mediastinal band, the spine and paravertebral region, and the heart with its pericardium.
    (The aorta and the central airways are cut out by the renderer.)
    """
    T = TEMPLATE
    d = cavity_distance(X, Y) if cavity_d is None else cavity_d
    inside = d < -1.5  # a thin pleura/endothoracic layer
    inside &= np.abs(X - T["med_x"]) > T["med_w"]
    sy = T["spine_y"]
    inside &= ((X / 30.0) ** 2 + ((Y - sy) / 27.0) ** 2) > 1.0
    inside &= ~((np.abs(X) < 24.0) & (Y < sy))
    inside &= Z > diaphragm_z(X, Y, g)
    inside &= Z < T["lung_top"] - 0.016 * (np.abs(X) - 55.0) ** 2 - 0.011 * (Y + 15.0) ** 2
    hc, hr = T["heart_c"], T["heart_r"]
    heart = ((X - hc[0]) / (hr[0] + 4)) ** 2 + ((Y - hc[1]) / (hr[1] + 4)) ** 2 + ((Z - hc[2]) / (hr[2] + 4)) ** 2
    inside &= heart > 1.0
    side = np.where(X > T["med_x"], 1, 2).astype(np.uint8)
    return np.where(inside, side, 0).astype(np.uint8)


def _oblique_z(Y, g: Geometry, left: bool):
    """Height of the oblique fissure: high posteriorly, reaching the diaphragm anteriorly."""
    z0 = 172.0 if not left else 166.0
    return z0 + g.fissure_dz - 0.85 * (Y + 85.0)


def lobe_of(X, Y, Z, side, g: Geometry):
    """Lobe label (uint8): 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL, 0 where ``side == 0``."""
    right_upper = Z > _oblique_z(Y, g, left=False)
    left_upper = Z > _oblique_z(Y, g, left=True)
    horizontal = Z > 128.0 + g.fissure_dz
    lobe = np.zeros(np.shape(X), np.uint8)
    r, lft = side == 1, side == 2
    lobe[r & right_upper & horizontal] = 1
    lobe[r & right_upper & ~horizontal] = 2
    lobe[r & ~right_upper] = 3
    lobe[lft & left_upper] = 4
    lobe[lft & ~left_upper] = 5
    return lobe


def fissure_distance(X, Y, Z, side, g: Geometry):
    """Approximate distance (template mm) to the nearest fissure of the point's lung."""
    slope = 0.85
    norm = np.sqrt(1 + slope**2)
    d_r = np.abs(Z - _oblique_z(Y, g, left=False)) / norm
    d_l = np.abs(Z - _oblique_z(Y, g, left=True)) / norm
    d_h = np.abs(Z - 128.0 - g.fissure_dz)
    d_h = np.where(Z > _oblique_z(Y, g, left=False), d_h, np.inf)  # horizontal fissure: anterior part
    return np.where(side == 1, np.minimum(d_r, d_h), np.where(side == 2, d_l, np.inf))


def sample_lung_points(g: Geometry, side: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform random template points inside one lung (rejection sampling), (n, 3)."""
    lo = np.array([0.0 if side == 1 else -135.0, -95.0, 5.0])
    hi = np.array([135.0 if side == 1 else 0.0, 95.0, 255.0])
    out, have = [], 0
    while have < n:
        p = rng.uniform(lo, hi, size=(4 * n, 3))
        keep = p[lung_side(p[:, 0], p[:, 1], p[:, 2], g) == side]
        out.append(keep)
        have += len(keep)
    return np.concatenate(out)[:n]


def subpleural_points(pts: np.ndarray, g: Geometry, side: int, depth: float) -> np.ndarray:
    """Boolean (N,): points within ``depth`` mm of the lung surface (probed along 14 directions)."""
    dirs = np.concatenate([np.eye(3), -np.eye(3), np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
                           / np.sqrt(3)])
    near = np.zeros(len(pts), bool)
    for d in dirs:
        q = pts + depth * d
        near |= lung_side(q[:, 0], q[:, 1], q[:, 2], g) != side
    return near


def grow_tree(start: np.ndarray, points: np.ndarray, radius: float, *, min_points: int = 5, max_gen: int = 12,
              step: float = 0.45, min_radius: float = 0.0) -> np.ndarray:
    """Grow a space-filling branching tree into a cloud of territory points (Kitaoka-style).

    Each branch runs from its start towards the centroid of its territory (``step`` of the way),
    then the territory is split in two by a plane that contains the branch direction and is
    normal to the territory's widest perpendicular axis; each half grows a child from the branch
    end. Radii follow Murray's law with flow proportional to territory size,
    ``r_child = r * (n_child / n) ** (1/3)``, so the tree tapers towards the periphery.
    A terminal branch reaches its territory's centroid.

    Args:
        start: (3,) root point (template mm).
        points: (N, 3) territory points (template mm).
        radius: root radius (template mm).
        min_points: a territory smaller than this ends in a terminal branch.
        max_gen: maximum generation.
        step: fraction of the distance to the centroid covered by a non-terminal branch.
        min_radius: branches thinner than this are not grown.

    Returns:
        segments (M, 9) float64: ``x0, y0, z0, x1, y1, z1, radius, generation, n_points``.
    """
    segs = []
    stack = [(np.asarray(start, float), np.asarray(points, float), float(radius), 0)]
    while stack:
        p0, pts, r, gen = stack.pop()
        if r < min_radius or len(pts) == 0:
            continue
        c = pts.mean(axis=0)
        v = c - p0
        length = np.linalg.norm(v)
        if length < 1e-6:
            continue
        terminal = len(pts) < min_points or gen >= max_gen
        p1 = c if terminal else p0 + step * v
        segs.append([*p0, *p1, r, gen, len(pts)])
        if terminal:
            continue
        u = v / length
        centred = pts - c
        perp = centred - np.outer(centred @ u, u)
        # principal axis of the perpendicular spread
        cov = perp.T @ perp
        w, vecs = np.linalg.eigh(cov)
        axis = vecs[:, -1]
        s = centred @ axis > 0
        n = len(pts)
        for part in (pts[s], pts[~s]):
            if len(part):
                stack.append((p1, part, r * (len(part) / n) ** (1 / 3), gen + 1))
    return np.asarray(segs, float).reshape(-1, 9)
