"""Render one synthetic chest CT on a voxel grid: HU image, lung mask, emphysema labels, lobes.

The work is vectorised: tissues are implicit functions of the template coordinates of every voxel
(:mod:`.anatomy`), tubes (airways, vessels, aorta) are rasterised segment by segment inside their
bounding boxes only, texture and emphysema patterns are thresholded Gaussian random fields, and
the acquisition (reconstruction blur + correlated quantum noise) is one Gaussian filter.

(About 380 lines, one idea: the tissues of one synthetic CT in the order they are drawn, each a
short function over the same voxel coordinates.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from drasclr_lib.data.synthetic.anatomy import (TEMPLATE, Geometry, cavity_distance, diaphragm_z, fissure_distance,
                                                grow_tree, lobe_of, lung_side, sample_lung_points, subpleural_points)

__all__ = ["SubjectSpec", "render_subject", "FOV_ADULT_MM", "HU"]

#: Field of view of the adult template (mm, x y z); a subject's grid is this times its size scale.
FOV_ADULT_MM = (350.0, 300.0, 310.0)
#: Lowest template Z in the field of view.
FOV_Z0 = -30.0

#: Tissue HU values (before calibration offset and noise).
HU = {"air": -1000.0, "fat": -100.0, "mediastinal_fat": -85.0, "muscle": 45.0, "skin": 25.0, "blood": 42.0,
      "liver": 58.0, "spleen": 40.0, "bone_cortex": 900.0, "bone_marrow": 260.0, "cartilage": 110.0,
      "disc": 85.0, "csf": 15.0, "soft": 40.0, "centrilobular": -1005.0, "panlobular": -985.0,
      "paraseptal": -1005.0}


@dataclass(frozen=True)
class SubjectSpec:
    """Everything that determines one rendered subject (drawn by :func:`.cohort.sample_spec`).

    Attributes:
        geometry: placement and body habitus.
        spacing: voxel size (mm, x y z).
        f_centrilobular, f_panlobular, f_paraseptal: target fractions of lung voxels per subtype.
        airway_wall: 0..1 airway wall thickening (non-emphysema disease).
        mucus_plugging: 0..1 probability that a distal airway (template radius < 2.5 mm) is plugged:
            its lumen is filled with mucus (soft tissue instead of air) and a 1.5-2.5 mm nodule sits
            at its end (tree-in-bud). Small-airway disease that a 32 mm patch shows but that barely
            changes %LAA-950.
        parenchyma_hu: mean HU of normal parenchyma (inspiration dependent).
        gradient_hu: dependent (posterior) minus mid-lung density difference.
        texture_hu: standard deviation of the parenchymal texture.
        noise_hu: standard deviation of the image noise after reconstruction.
        recon_sigma_mm: in-plane reconstruction blur (Gaussian sigma, mm).
        hu_offset: calibration offset added to every voxel.
        pruning: 0..1 vessel pruning in the lower lobes (panlobular emphysema).
        seed: integer seed of the anatomy and noise streams.
    """

    geometry: Geometry
    spacing: tuple
    f_centrilobular: float
    f_panlobular: float
    f_paraseptal: float
    airway_wall: float
    parenchyma_hu: float
    gradient_hu: float
    texture_hu: float
    noise_hu: float
    recon_sigma_mm: float
    hu_offset: float
    pruning: float
    seed: int
    mucus_plugging: float = 0.0


def _grid(spacing, scale):
    """Voxel grid: shape (nx, ny, nz), world axes (1-D, mm) and the RAS affine."""
    fov = np.array(FOV_ADULT_MM) * scale
    sp = np.asarray(spacing, float)
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(fov, sp))
    origin = np.array([-(shape[0] - 1) * sp[0] / 2, -(shape[1] - 1) * sp[1] / 2, FOV_Z0 * scale])
    axes = [origin[i] + sp[i] * np.arange(shape[i]) for i in range(3)]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(sp)
    affine[:3, 3] = origin
    return shape, axes, affine


def _raster_tubes(field, box_origin, spacing, p0s, p1s, radii, soft=0.8):
    """Rasterise tubes (capsules) into ``field`` in place, keeping the maximum occupancy.

    Args:
        field: (nx, ny, nz) float32 occupancy in [0, 1] on an axis-aligned grid.
        box_origin: world position of ``field[0, 0, 0]`` (mm).
        spacing: voxel size (mm).
        p0s, p1s: (M, 3) segment end points (world mm).
        radii: (M,) radii (mm).
        soft: width (mm) of the partial-volume ramp at the tube surface.
    """
    sp = np.asarray(spacing, float)
    shape = np.array(field.shape)
    for p0, p1, r in zip(p0s, p1s, radii):
        pad = r + soft
        lo = np.floor((np.minimum(p0, p1) - pad - box_origin) / sp).astype(int)
        hi = np.ceil((np.maximum(p0, p1) + pad - box_origin) / sp).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
        if np.any(hi <= lo):
            continue
        xs = (box_origin[0] + sp[0] * np.arange(lo[0], hi[0]) - p0[0])[:, None, None]
        ys = (box_origin[1] + sp[1] * np.arange(lo[1], hi[1]) - p0[1])[None, :, None]
        zs = (box_origin[2] + sp[2] * np.arange(lo[2], hi[2]) - p0[2])[None, None, :]
        d = p1 - p0
        dd = float(d @ d)
        t = np.clip((xs * d[0] + ys * d[1] + zs * d[2]) / dd, 0, 1) if dd > 0 else 0.0
        dist = np.sqrt((xs - t * d[0]) ** 2 + (ys - t * d[1]) ** 2 + (zs - t * d[2]) ** 2)
        occ = np.clip((r - dist) / soft + 0.5, 0, 1).astype(np.float32)
        sub = field[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(sub, occ, out=sub)


def _polyline(points, radius, g: Geometry):
    """World segments (p0s, p1s, radii) of a template polyline with one template radius."""
    w = g.to_world(np.asarray(points, float))
    r = np.full(len(w) - 1, radius * g.radius_scale)
    return w[:-1], w[1:], r


def _smooth_field(rng, shape, sigma_vox):
    """Standard-normal Gaussian random field (float32) with the given correlation (voxels)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, truncate=3.0)
    return f / max(float(f.std()), 1e-6)


def _kernel_gain(sigma_vox, truncate=4.0):
    """Factor by which scipy's Gaussian filter reduces the std of white noise."""
    gain = 1.0
    for s in sigma_vox:
        if s <= 0:
            continue
        r = int(truncate * s + 0.5)
        w = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        w /= w.sum()
        gain *= float(np.sqrt((w**2).sum()))
    return gain


def render_subject(spec: SubjectSpec) -> dict:
    """Render one subject.

    Returns:
        dict with ``image`` (nx, ny, nz) int16 HU, ``lung_mask`` uint8 (1 right, 2 left),
        ``label_map`` uint8 (1 centrilobular, 2 panlobular, 3 paraseptal), ``lobe_map`` uint8
        (1 RUL .. 5 LLL), ``affine`` (4, 4) RAS, and ``stats`` (measured fractions, volumes).
    """
    g, sp = spec.geometry, np.asarray(spec.spacing, float)
    rng = np.random.default_rng(spec.seed)
    shape, axes, affine = _grid(sp, g.scale)
    origin = affine[:3, 3]
    xw, yw, zw = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    X, Y, Z = g.to_template(xw, yw, zw)
    T = TEMPLATE

    # --- body wall, layers by radial distance to the cavity --------------------------------------
    d = cavity_distance(X, Y)
    hu = np.full(shape, HU["air"], np.float32)
    wall, fat = T["wall"], g.fat
    hu[d < wall + fat + T["skin"]] = HU["skin"]
    hu[d < wall + fat] = HU["fat"]
    hu[d < wall] = HU["muscle"]
    cavity = d < 0
    hu[cavity] = HU["mediastinal_fat"]
    # abdomen below the diaphragm: liver on the right, spleen / stomach on the left
    below = cavity & (Z < diaphragm_z(X, Y, g) - 2.0)
    hu[below & (X > -25)] = HU["liver"]
    hu[below & (X <= -25)] = HU["spleen"]

    # ribs: tubes following the wall, descending anteriorly, every 26 mm
    rib_zone = (d > 0) & (d < wall)
    idx = np.nonzero(rib_zone)
    zc = Z[idx] + 20.0 * (Y[idx] / T["cavity_b"] + 1.0)  # anterior ends are lower
    k = np.round((zc - 12.0) / 26.0)
    dz = zc - (12.0 + 26.0 * k)
    dr = d[idx] - 8.0
    q = (dr / 4.5) ** 2 + (dz / 7.0) ** 2
    anterior_gap = (np.abs(X[idx]) < 30) & (Y[idx] > 0)
    valid = (k >= 0) & (k <= 10)
    rib = (q < 1) & valid & ~anterior_gap
    cart = (q < 1) & valid & anterior_gap & (np.abs(X[idx]) > 12)
    vals = hu[idx]
    vals = np.where(rib, np.where(q > 0.45, HU["bone_cortex"], HU["bone_marrow"]), vals)
    vals = np.where(cart, HU["cartilage"], vals)
    hu[idx] = vals

    # spine: vertebral bodies with discs, canal, posterior arch; sternum
    sy, sr = T["spine_y"], T["spine_r"]
    vb = (X / sr) ** 2 + ((Y - sy) / (sr * 0.9)) ** 2
    disc = np.abs(((Z - 5.0) % 28.0) - 14.0) > 11.5
    hu[vb < 1] = np.where(disc[vb < 1], HU["disc"], HU["bone_marrow"])
    hu[(vb >= 0.72) & (vb < 1) & ~disc] = HU["bone_cortex"]
    arch = (X / 17.0) ** 2 + ((Y - sy + 30.0) / 15.0) ** 2
    hu[arch < 1] = HU["bone_cortex"]
    hu[(np.abs(X) < 5) & (Y < sy - 30) & (Y > sy - 58) & (d < wall)] = HU["bone_marrow"]
    hu[(X / 8.0) ** 2 + ((Y - sy + 30.0) / 8.0) ** 2 < 1] = HU["csf"]
    st = (np.abs(X) < 17) & (np.abs(Y - (T["cavity_b"] + 6.0)) < 6) & (Z > 120) & (Z < 235)
    hu[st] = np.where(np.abs(Y[st] - T["cavity_b"] - 6.0) > 4, HU["bone_cortex"], HU["bone_marrow"])

    # heart with pericardial fat
    hc, hr = T["heart_c"], T["heart_r"]
    he = ((X - hc[0]) / hr[0]) ** 2 + ((Y - hc[1]) / hr[1]) ** 2 + ((Z - hc[2]) / hr[2]) ** 2
    hu[(he < 1.12) & cavity] = HU["mediastinal_fat"]
    hu[(he < 1) & cavity] = HU["blood"]

    # --- lungs ------------------------------------------------------------------------------------
    side = lung_side(X, Y, Z, g, cavity_d=d)
    # great vessels and central airways (solid tubes, template polylines)
    rs = g.radius_scale
    big = np.zeros(shape, np.float32)
    tubes = [
        ([(-24, -50, FOV_Z0 - 5), (-24, -50, 170), (-16, -22, 196), (4, 18, 190), (8, 35, 150), (8, 40, 110)], 13.0),
        ([(22, 22, 280), (22, 22, 120)], 9.0),  # superior vena cava
        ([(-8, 48, 110), (-8, 25, 140), (36, 2, 140)], 10.0),  # pulmonary trunk -> right PA
        ([(-8, 25, 140), (-42, -2, 138)], 9.0),  # left PA
        ([(-10, 5, 95), (40, 12, 112)], 7.0),  # pulmonary veins
        ([(-10, 5, 95), (-42, 8, 108)], 7.0),
        ([(-4, -48, 280), (-4, -48, FOV_Z0 - 5)], 7.0),  # oesophagus
    ]
    for pts, r in tubes:
        _raster_tubes(big, origin, sp, *_polyline(pts, r, g))
    hu = np.where(big > 0.5, HU["blood"], hu)
    side[big > 0.5] = 0

    carina = np.array(T["carina"])
    top = np.array([0.0, -20.0, FOV_Z0 + 310.0 - 8.0 / max(g.hz, 1e-3)])  # ends 8 mm below the top slice
    hila_aw = {1: np.array([36.0, -16.0, 146.0]), 2: np.array([-42.0, -14.0, 140.0])}
    central = [(top, carina, 9.0), (carina, hila_aw[1], 7.5), (carina, hila_aw[2], 6.5)]
    wall_f = 1.0 + 1.5 * spec.airway_wall
    c_out = np.zeros(shape, np.float32)
    c_lum = np.zeros(shape, np.float32)
    for p0, p1, r in central:
        w = g.to_world(np.stack([p0, p1]))
        _raster_tubes(c_out, origin, sp, w[:1], w[1:], [(r + 2.2 * wall_f) * rs])
        _raster_tubes(c_lum, origin, sp, w[:1], w[1:], [r * rs])
    side[c_out > 0.5] = 0
    lung = side > 0

    # lung bounding box: every lung-only computation happens inside it
    nz = np.nonzero(lung.any(axis=(1, 2)))[0], np.nonzero(lung.any(axis=(0, 2)))[0], np.nonzero(lung.any(axis=(0, 1)))[0]
    lo = np.array([max(a[0] - 2, 0) for a in nz])
    hi = np.array([min(a[-1] + 3, s) for a, s in zip(nz, shape)])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(hi - lo)
    borigin = origin + lo * sp
    bX, bY, bZ, bside = X[box], Y[box], Z[box], side[box]
    blung = bside > 0
    lobes_b = lobe_of(bX, bY, bZ, bside, g)

    # parenchyma: level + dependent gradient + correlated texture + faint fissures
    sig = lambda mm: tuple(mm / s for s in sp)  # noqa: E731 - mm -> voxels
    par = spec.parenchyma_hu - spec.gradient_hu * (bY / T["cavity_b"])
    par = par + spec.texture_hu * _smooth_field(rng, bshape, sig(1.2))
    fd = fissure_distance(bX, bY, bZ, bside, g)
    par = par + 160.0 * np.clip(1.0 - fd / 0.9, 0, 1)

    # emphysema: thresholded Gaussian fields with spatially varying target fractions
    zrel = np.clip(bZ / T["lung_top"], 0, 1)
    labels_b = np.zeros(bshape, np.uint8)
    n_lung = max(int(blung.sum()), 1)
    if spec.f_centrilobular > 0:
        w = np.clip((zrel - 0.2) / 0.55, 0.05, 1.0) ** 1.5  # upper-zone predominant
        frac = w * (spec.f_centrilobular / max(float(w[blung].mean()), 1e-6))
        hole = ndtr(_smooth_field(rng, bshape, sig(3.0))) > 1.0 - np.minimum(frac, 0.92)
        hole &= blung
        labels_b[hole] = 1
        par = np.where(hole, HU["centrilobular"] + 0.15 * (par - spec.parenchyma_hu), par)
    if spec.f_panlobular > 0:
        lower = np.isin(lobes_b, (3, 5)).astype(np.float32)
        w = (0.12 + 0.88 * lower) * np.clip((0.85 - zrel) / 0.5, 0.15, 1.0)
        frac = w * (spec.f_panlobular / max(float(w[blung].mean()), 1e-6))
        region = ndtr(_smooth_field(rng, bshape, sig(6.0))) > 1.0 - np.minimum(frac, 0.97)
        region &= blung & (labels_b == 0)
        labels_b[region] = 2
        par = np.where(region, HU["panlobular"] + 0.15 * (par - spec.parenchyma_hu), par)

    # trees: airways and arteries share territories (bronchovascular bundles), veins have their own
    vessel = np.zeros(bshape, np.float32)
    aw_out = np.zeros(bshape, np.float32)
    aw_lum = np.zeros(bshape, np.float32)
    hila_pa = {1: np.array([38.0, 2.0, 140.0]), 2: np.array([-44.0, 0.0, 137.0])}
    hila_pv = {1: np.array([40.0, 12.0, 112.0]), 2: np.array([-44.0, 10.0, 106.0])}
    pts_by_side = {}
    n_plugged = 0
    for s_ in (1, 2):
        pts = sample_lung_points(g, s_, 1100, rng)
        pts_by_side[s_] = pts
        aw = grow_tree(hila_aw[s_], pts, 5.5, min_points=6, max_gen=7, min_radius=1.0)
        art = grow_tree(hila_pa[s_], pts, 6.5, min_points=4, max_gen=10)
        vein = grow_tree(hila_pv[s_], sample_lung_points(g, s_, 1100, rng), 6.5, min_points=4, max_gen=10)
        for segs, kind in ((art, "v"), (vein, "v"), (aw, "a")):
            p0, p1, r = g.to_world(segs[:, 0:3]), g.to_world(segs[:, 3:6]), segs[:, 6] * rs
            if kind == "v":
                if spec.pruning > 0:  # panlobular: small lower-lobe vessels thinned and dropped
                    mid = 0.5 * (segs[:, 0:3] + segs[:, 3:6])
                    low = np.isin(lobe_of(mid[:, 0], mid[:, 1], mid[:, 2], np.full(len(mid), s_), g), (3, 5))
                    small = segs[:, 6] < 2.5
                    drop = low & small & (rng.random(len(segs)) < 0.85 * spec.pruning)
                    r = np.where(low, r * (1 - 0.35 * spec.pruning), r)
                    p0, p1, r = p0[~drop], p1[~drop], r[~drop]
                keep = r > 0.3
                _raster_tubes(vessel, borigin, sp, p0[keep], p1[keep], r[keep])
            else:
                lum = 0.85 * r
                _raster_tubes(aw_out, borigin, sp, p0, p1, lum + (0.2 * lum + 0.35 * rs) * wall_f)
                # mucus plugging: distal lumens filled, a tree-in-bud nodule at each plugged end
                # (the draws happen for every subject, so mucus_plugging = 0 leaves the rest unchanged)
                u_plug, r_bud = rng.random(len(segs)), rng.uniform(1.5, 2.5, len(segs)) * rs
                plugged = (segs[:, 6] < 2.5) & (u_plug < spec.mucus_plugging)
                _raster_tubes(aw_lum, borigin, sp, p0[~plugged], p1[~plugged], lum[~plugged])
                _raster_tubes(aw_out, borigin, sp, p1[plugged], p1[plugged], r_bud[plugged])
                n_plugged += int(plugged.sum())

    # paraseptal: subpleural bullae in the upper two thirds
    if spec.f_paraseptal > 0:
        vox_ml = float(np.prod(sp)) / 1000.0
        target = spec.f_paraseptal * n_lung
        bulla = np.zeros(bshape, np.float32)
        for s_ in (1, 2):
            cand = sample_lung_points(g, s_, 600, rng)
            cand = cand[(cand[:, 2] > 90) & subpleural_points(cand, g, s_, 6.0)]
            if len(cand) == 0:
                continue
            side_target = target * float((bside == s_).sum()) / n_lung
            vol = 0.0
            for c in cand[rng.permutation(len(cand))]:
                if vol >= side_target:
                    break
                r_t = rng.uniform(4.0, 11.0)
                w = g.to_world(c[None])
                _raster_tubes(bulla, borigin, sp, w, w, [r_t * rs])
                vol = float(((bulla > 0.5) & (bside == s_)).sum()) if rng.random() < 0.3 else vol + (
                    4 / 3 * np.pi * (r_t * rs) ** 3 / 1000.0 / vox_ml) * 0.6
        cyst = (bulla > 0.5) & blung
        labels_b[cyst] = 3
        par = np.where(cyst, HU["paraseptal"], par)
        vessel[cyst] = 0
        rim = (bulla > 0.1) & (bulla <= 0.5) & blung
        par = np.where(rim, par + 120.0, par)

    # compose the lung: parenchyma, vessels, airway walls and lumens
    par = par * (1 - vessel) + HU["blood"] * vessel
    par = par * (1 - aw_out) + HU["soft"] * aw_out
    par = par * (1 - aw_lum) + HU["air"] * aw_lum
    structure = (vessel > 0.5) | (aw_out > 0.5)
    labels_b[structure | ~blung] = 0
    hub = hu[box]
    hub[blung] = par[blung]
    hu[box] = hub

    # central airways drawn last (they cross the mediastinum)
    hu = hu * (1 - c_out) + HU["soft"] * c_out
    hu = hu * (1 - c_lum) + HU["air"] * c_lum

    # --- acquisition: reconstruction blur with correlated noise, calibration offset ---------------
    s_rec = np.array([spec.recon_sigma_mm / sp[0], spec.recon_sigma_mm / sp[1], 0.35])
    gain = _kernel_gain(s_rec)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= spec.noise_hu / gain
    hu += noise
    hu = ndimage.gaussian_filter(hu, s_rec, truncate=4.0)
    hu += spec.hu_offset
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    label_map = np.zeros(shape, np.uint8)
    lobe_map = np.zeros(shape, np.uint8)
    label_map[box] = labels_b
    lobes_b[~blung] = 0
    lobe_map[box] = lobes_b
    lung_mask = side

    inside = image[lung_mask > 0]
    n = max(inside.size, 1)
    stats = {
        "emph_centrilobular": float((label_map == 1).sum() / n),
        "emph_panlobular": float((label_map == 2).sum() / n),
        "emph_paraseptal": float((label_map == 3).sum() / n),
        "laa950": float(100.0 * (inside < -950).sum() / n),
        "lung_volume_ml": float(n * np.prod(sp) / 1000.0),
        "mean_lung_hu": float(inside.mean()) if inside.size else float("nan"),
    }
    stats["vessel_fraction"] = float((vessel > 0.5)[blung].mean())
    stats["airway_fraction"] = float((aw_out > 0.5)[blung].mean())
    stats["plugged_airways"] = n_plugged
    stats["emph_fraction"] = stats["emph_centrilobular"] + stats["emph_panlobular"] + stats["emph_paraseptal"]
    return {"image": image, "lung_mask": lung_mask, "label_map": label_map, "lobe_map": lobe_map,
            "affine": affine, "stats": stats}
