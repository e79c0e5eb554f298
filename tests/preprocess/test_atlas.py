"""The grid rule, the Atlas class and its geometry, the reference-subject choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.preprocess.atlas_source import choose_reference
from drasclr_lib.preprocess.landmarks import atlas_landmarks, nearest_neighbors, normalize_locations

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "reference"


def _loop_rule(mask, patch_size, step, min_fraction, max_patches):
    """The published triple loop, verbatim in structure (slow; tiny masks only)."""
    nx, ny, nz = mask.shape
    vol = patch_size**3
    thr = min_fraction
    while True:
        kept = []
        for x in range(0, nx - patch_size, step):
            for y in range(0, ny - patch_size, step):
                for z in range(0, nz - patch_size, step):
                    if (mask[x:x + patch_size, y:y + patch_size, z:z + patch_size] > 0).sum() > thr * vol:
                        kept.append([x, y, z])
        if len(kept) < max_patches:
            return np.array(kept, dtype=np.int64).reshape(-1, 3)
        if thr < 1:
            thr += 0.1
        else:
            return np.zeros((0, 3), dtype=np.int64)


def test_grid_rule_hand_checked_bounds_and_strictness():
    # 10 voxels per axis, patch 4, step 3: starts range(0, 10 - 4, 3) = 0, 3 (6 is excluded).
    # Coordinates 0..2 lie only in window 0, 4..6 only in window 3, 7..9 in no window.
    m = np.zeros((10, 10, 10), np.uint8)
    m[0:3, 0:3, 0:3] = 1  # 27 voxels, all in patch (0, 0, 0)
    m[4:7, 4:7, 4:6] = 2  # 18 voxels, all in patch (3, 3, 3)
    m[7:10, 7:10, 7:10] = 1  # a patch at 6 would hold these; the rule never visits it
    m[0:3, 4:7, 0:1] = 1  # 9 voxels in patch (0, 3, 0)
    assert atlas_landmarks(m, patch_size=4, step=3, min_fraction=0.1).tolist() == [[0, 0, 0], [0, 3, 0], [3, 3, 3]]
    assert atlas_landmarks(m, patch_size=4, step=3, min_fraction=9 / 64).tolist() == [[0, 0, 0], [3, 3, 3]]
    # strictly more than the threshold: 18 voxels do not pass at 18/64
    assert atlas_landmarks(m, patch_size=4, step=3, min_fraction=18 / 64).tolist() == [[0, 0, 0]]
    assert atlas_landmarks(m, patch_size=4, step=3, min_fraction=27 / 64).shape == (0, 3)
    # max_patches=3 with 3 kept raises the threshold to 0.2 (12.8 voxels): the 9-voxel patch drops
    assert atlas_landmarks(m, patch_size=4, step=3, min_fraction=0.1, max_patches=3).tolist() == [[0, 0, 0], [3, 3, 3]]


def test_grid_rule_last_start_excluded():
    # size 8, patch 4, step 4: range(0, 4, 4) = [0] only, though a patch at 4 would fit
    m = np.ones((8, 8, 8), np.uint8)
    assert atlas_landmarks(m, patch_size=4, step=4).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_rule_matches_published_loop(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(20, 34, size=3))
    m = np.zeros(shape, np.int16)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    m[((zz - shape[0] / 2) ** 2 / 80 + (yy - shape[1] / 2) ** 2 / 60 + (xx - shape[2] / 2) ** 2 / 50) < 1] = 50
    m[rng.random(shape) < 0.05] = 100
    for kwargs in ({"min_fraction": 0.1, "max_patches": 1000}, {"min_fraction": 0.05, "max_patches": 6}):
        got = atlas_landmarks(m, patch_size=6, step=4, **kwargs)
        want = _loop_rule(m, 6, 4, kwargs["min_fraction"], kwargs["max_patches"])
        assert got.tolist() == want.tolist()


def test_threshold_raised_when_too_many():
    m = np.zeros((30, 30, 30), np.uint8)
    m[:, :, :15] = 1  # patches with z start 0..: fractions 1.0, 1.0, 0.43, 0, ...
    everything = atlas_landmarks(m, patch_size=6, step=3, min_fraction=0.0, max_patches=10**6)
    few = atlas_landmarks(m, patch_size=6, step=3, min_fraction=0.1, max_patches=len(everything))
    # at 0.1 the half-covered patches pass; the cap forces the threshold up until they drop
    loose = atlas_landmarks(m, patch_size=6, step=3, min_fraction=0.1, max_patches=10**6)
    assert len(few) < len(loose)
    assert len(few) < len(everything)
    # exactly max_patches also triggers the raise (>=)
    exact = atlas_landmarks(m, patch_size=6, step=3, min_fraction=0.1, max_patches=len(loose))
    assert len(exact) < len(loose)
    assert atlas_landmarks(np.zeros((20, 20, 20)), patch_size=4, step=4).shape == (0, 3)


def test_bad_input():
    with pytest.raises(ValueError, match="3D"):
        atlas_landmarks(np.ones((10, 10)))


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference is absent")
def test_grid_rule_on_published_atlas():
    import nibabel as nib

    mask = np.asarray(nib.load(str(SHARED / "atlas_lung_mask.nii.gz")).dataobj)
    published = np.load(SHARED / "atlas_patch_loc.npy")
    corners = atlas_landmarks(mask)
    assert corners.shape == (575, 3)
    pub = {tuple(c) for c in published.tolist()}
    assert all(tuple(c) in pub for c in corners.tolist())
    # same visiting order as the published set
    pos = [published.tolist().index(c) for c in corners.tolist()]
    assert np.all(np.diff(pos) > 0)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference is absent")
def test_published_atlas_geometry_survives_reorientation():
    atlas = Atlas.from_files(SHARED / "atlas_lung_mask.nii.gz", SHARED / "atlas_patch_loc.npy")
    raw = sitk.ReadImage(str(SHARED / "atlas_lung_mask.nii.gz"))
    assert atlas.num_locations == 581
    assert atlas.mask.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))  # reoriented to LPS
    assert raw.GetDirection() != atlas.mask.GetDirection()  # the file is stored with a flipped axis
    for c in atlas.corners[[0, 100, 580]]:
        p_file = np.array(raw.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]))
        assert np.allclose(atlas.index_to_physical(c[None])[0], p_file)
        idx_re = atlas.mask.TransformPhysicalPointToIndex(tuple(p_file))
        assert atlas.mask[idx_re] == (raw[[int(v) for v in c]] > 0)
    # the published mask's voxels are lung at the same physical point either way
    arr = atlas.mask_array_ijk()
    assert np.array_equal(arr > 0, sitk.GetArrayFromImage(raw).transpose(2, 1, 0) > 0)
    # grid rule on the mask alone gives the 575
    assert Atlas.from_files(SHARED / "atlas_lung_mask.nii.gz").num_locations == 575


def _flipped_mask():
    m = np.zeros((70, 60, 50), np.uint8)  # (i, j, k)
    m[10:35, 10:50, 8:42] = 1
    m[40:62, 10:50, 8:42] = 2
    img = sitk.GetImageFromArray(m.transpose(2, 1, 0).copy())
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin((100.0, -20.0, 5.0))
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))  # stored flipped on i and k w.r.t. LPS
    return m, img


def test_atlas_from_files_and_save_roundtrip(tmp_path):
    m, img = _flipped_mask()
    sitk.WriteImage(img, str(tmp_path / "mask.nii.gz"))
    atlas = Atlas.from_files(tmp_path / "mask.nii.gz", patch_size=16, step=10)
    assert np.array_equal(atlas.corners, atlas_landmarks(m, patch_size=16, step=10))
    assert atlas.locs.shape == atlas.corners.shape and atlas.locs.min() >= -1 and atlas.locs.max() <= 1
    assert np.array_equal(atlas.neighbors(2), nearest_neighbors(atlas.corners, 2))
    phys = atlas.patch_centers_physical()
    want = np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) + 7.5 for v in c]) for c in atlas.corners])
    assert np.allclose(phys, want)
    mask_p, lm_p = atlas.save(tmp_path / "store")
    back = Atlas.from_files(mask_p, lm_p, patch_size=16)
    assert np.array_equal(back.corners, atlas.corners)
    assert np.allclose(back.patch_centers_physical(), phys)
    assert np.array_equal(sitk.GetArrayFromImage(back.mask), sitk.GetArrayFromImage(atlas.mask))


def test_atlas_validation(tmp_path):
    _, img = _flipped_mask()
    sitk.WriteImage(img, str(tmp_path / "mask.nii.gz"))
    np.save(tmp_path / "bad.npy", np.array([[0, 0, 0], [1, 1, 1], [69, 0, 0]]))
    with pytest.raises(ValueError, match="outside the atlas grid"):
        Atlas.from_files(tmp_path / "mask.nii.gz", tmp_path / "bad.npy", patch_size=16)
    with pytest.raises(FileNotFoundError):
        Atlas.from_files(tmp_path / "nope.nii.gz")
    empty = sitk.Image([40, 40, 40], sitk.sitkUInt8)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    with pytest.raises(ValueError, match="no lung"):
        Atlas.from_files(tmp_path / "empty.nii.gz")


def test_choose_reference_median_lung_volume(tmp_path):
    rows = []
    for sid, n in (("c", 30), ("a", 10), ("b", 20), ("d", 40)):
        m = np.zeros((10, 10, 10), np.uint8)
        m.flat[:n] = 1
        sitk.WriteImage(sitk.GetImageFromArray(m), str(tmp_path / f"{sid}.nii.gz"))
        rows.append({"sid": sid, "image": str(tmp_path / f"{sid}.nii.gz"), "lung_mask": str(tmp_path / f"{sid}.nii.gz")})
    assert choose_reference(pd.DataFrame(rows)) == "b"  # lower median of 10, 20, 30, 40
    assert choose_reference(pd.DataFrame(rows[:3])) == "b"
    no_masks = pd.DataFrame(rows).drop(columns="lung_mask")
    assert choose_reference(no_masks) in {"a", "b", "c", "d"}  # equal scanned volumes: sorted sid order


def test_warp_identity_and_translation():
    _, img = _flipped_mask()
    atlas = Atlas(mask=sitk.DICOMOrient(sitk.Cast(img > 0, sitk.sitkUInt8), "LPS"), corners=np.array([[0, 0, 0]]),
                  source="t", patch_size=16)
    same = atlas.warp(img)
    assert np.array_equal(sitk.GetArrayFromImage(same) > 0, sitk.GetArrayFromImage(atlas.mask) > 0)
    moved = atlas.warp(img, sitk.TranslationTransform(3, (0.0, 0.0, 3.0)))  # atlas p -> subject p + 3 mm in z
    a = sitk.GetArrayFromImage(atlas.mask) > 0
    w = sitk.GetArrayFromImage(moved) > 0
    assert w.sum() == a.sum() and not np.array_equal(w, a)


# --------------------------------------------------------------------------------------------
# Anatomical neighbours: nearest by distance, ties without direction bias
# --------------------------------------------------------------------------------------------
def _offset_shares(corners, nbrs):
    """Share of the picks per offset vector and per axis (axis = largest |offset| component)."""
    off = corners[nbrs] - corners[:, None, :]  # (L, k, 3)
    _, counts = np.unique(off.reshape(-1, 3), axis=0, return_counts=True)
    axis = np.argmax(np.abs(off), axis=-1).ravel()
    return counts / nbrs.size, np.bincount(axis, minlength=3) / nbrs.size


def _exact_dists(corners, nbrs):
    c = np.asarray(corners, dtype=np.float64)
    return np.linalg.norm(c[nbrs] - c[:, None, :], axis=-1)


def test_neighbors_never_self_on_small_grid():
    # 3x3x3 corners on a 26-voxel step: the centre has 6 tied nearest, a corner 3, an edge 4
    g = np.stack(np.meshgrid(*[np.arange(3) * 26] * 3, indexing="ij"), -1).reshape(-1, 3)
    for k in (1, 2, 6):
        nb = nearest_neighbors(g, k)
        assert nb.shape == (27, k) and nb.dtype == np.int64
        assert not np.any(nb == np.arange(27)[:, None])
        assert all(len(set(row)) == k for row in nb.tolist())
        d = _exact_dists(g, nb)
        assert np.all(d[:, 0] == 26.0)  # every location of the grid has a face neighbour
        full = np.linalg.norm(g[:, None] - g[None], axis=-1)
        np.fill_diagonal(full, np.inf)
        assert np.array_equal(d, np.sort(full, axis=1)[:, :k])
    # k = 2: the second neighbour is on another axis than the first
    off = g[nearest_neighbors(g, 2)] - g[:, None]
    assert np.all(np.argmax(np.abs(off[:, 0]), -1) != np.argmax(np.abs(off[:, 1]), -1))
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbors(g, 27)


def test_neighbors_determinism_and_global_rng_independence():
    g = np.stack(np.meshgrid(*[np.arange(4) * 26] * 3, indexing="ij"), -1).reshape(-1, 3)
    np.random.seed(1)
    a = nearest_neighbors(g, 2, seed=3)
    np.random.seed(2)
    np.random.random(100)
    assert np.array_equal(a, nearest_neighbors(g, 2, seed=3))
    assert not all(np.array_equal(nearest_neighbors(g, 2, seed=s), a) for s in range(4, 8))


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference (published atlas_patch_loc.npy) is absent")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbors_on_published_landmarks_spread_over_directions(seed):
    corners = np.load(SHARED / "atlas_patch_loc.npy")
    nb = nearest_neighbors(corners, 2, seed=seed)
    assert nb.shape == (581, 2)
    assert np.array_equal(nb, nearest_neighbors(corners, 2, seed=seed))  # deterministic
    assert not np.any(nb == np.arange(581)[:, None])
    # minimal distance for every rank: the same distances as a full sort
    full = np.sqrt(((corners[:, None].astype(np.float64) - corners[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    assert np.array_equal(_exact_dists(corners, nb), np.sort(full, axis=1)[:, :2])
    per_offset, per_axis = _offset_shares(corners, nb)
    assert per_offset.max() <= 1 / 3, per_offset
    assert per_axis.min() >= 0.15, per_axis
    # the lowest-index rule fails this (two offsets take 78.6 % of the picks)
    lowest = np.lexsort((np.broadcast_to(np.arange(581), full.shape), full), axis=1)[:, :2]
    assert _offset_shares(corners, lowest)[0].max() > 1 / 3


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference (published code and landmarks) is absent")
def test_neighbors_and_locations_match_published_copd_patch():
    """copd_patch.py: pairwise_distances, argsort(dists[i])[1:k+1], patch_loc / max(0) * 2 - 1."""
    from sklearn.metrics import pairwise_distances

    patch_loc = np.load(SHARED / "atlas_patch_loc.npy")
    dists = pairwise_distances(patch_loc, metric="euclidean")
    pub_loc = (patch_loc / patch_loc.max(0)) * 2 - 1
    k = 2
    pub_nb = np.stack([np.argsort(dists[i, :])[1:(k + 1)] for i in range(len(patch_loc))])
    np.testing.assert_allclose(normalize_locations(patch_loc), pub_loc, rtol=0, atol=1e-6)
    nb = nearest_neighbors(patch_loc, k)
    assert not np.any(pub_nb == np.arange(len(patch_loc))[:, None])  # published [1:] does drop itself
    # rank by rank, our neighbours are as near as the published ones (they differ only by ties)
    np.testing.assert_allclose(np.take_along_axis(dists, nb, 1), np.take_along_axis(dists, pub_nb, 1), rtol=0,
                               atol=1e-9)
    np.testing.assert_array_equal(_exact_dists(patch_loc, nb), _exact_dists(patch_loc, pub_nb))


# --------------------------------------------------------------------------------------------
# The published atlas, shipped with the package
# --------------------------------------------------------------------------------------------
def test_published_atlas_is_shipped_with_its_notice():
    from drasclr_lib.preprocess.atlas_source import PUBLISHED_SOURCE, published_atlas_files, published_landmarks

    files = published_atlas_files()
    assert all(p.is_file() for p in files.values())
    notice = files["notice"].read_text()
    assert "Copyright (c) 2023 batmanlab" in notice and "Permission is hereby granted" in notice
    assert "github.com/batmanlab/DrasCLR" in notice and "github.com/batmanlab/DrasCLR" in PUBLISHED_SOURCE
    corners = published_landmarks()
    assert corners.shape == (581, 3) and corners.dtype == np.int64
    # the package data of the wheel: pyproject's package-data globs take the three files
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["drasclr_lib"]
    package = REPO / "drasclr_lib"
    shipped = {p for g in globs for p in package.glob(g)}
    assert set(files.values()) <= shipped, (globs, files)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference is absent")
def test_resolve_published_gives_the_reference_landmarks_and_mask():
    from drasclr_lib.data.patch_store import image_grid
    from drasclr_lib.preprocess.atlas_source import PUBLISHED_SOURCE, published_atlas_files, resolve_atlas

    files = published_atlas_files()
    for name, ref in (("mask", "atlas_lung_mask.nii.gz"), ("landmarks", "atlas_patch_loc.npy")):
        assert files[name].read_bytes() == (SHARED / ref).read_bytes(), name  # unchanged copies
    atlas = resolve_atlas("published")
    reference = np.load(SHARED / "atlas_patch_loc.npy")
    assert atlas.num_locations == 581 and np.array_equal(atlas.corners, reference)  # same corners, same order
    assert atlas.source == PUBLISHED_SOURCE
    raw = sitk.ReadImage(str(SHARED / "atlas_lung_mask.nii.gz"))
    geometry = image_grid(raw)
    assert atlas.corner_geometry["size"] == list(geometry["size"]) == [387, 387, 319]
    for key in ("origin", "spacing", "direction"):
        np.testing.assert_allclose(atlas.corner_geometry[key], geometry[key], atol=1e-6)
    assert np.array_equal(atlas.mask_array_ijk() > 0, sitk.GetArrayFromImage(raw).transpose(2, 1, 0) > 0)
    np.testing.assert_allclose(atlas.locs, normalize_locations(reference))
    # spelled by a user
    assert np.array_equal(resolve_atlas(" Published ").corners, reference)


def test_is_published_corners():
    from drasclr_lib.preprocess.atlas_source import is_published_corners, published_landmarks

    corners = published_landmarks()
    assert is_published_corners(corners) and is_published_corners(corners.tolist())
    moved = corners.copy()
    moved[17, 2] += 1
    assert not is_published_corners(moved)
    assert not is_published_corners(corners[::-1])  # the order is the location index
    assert not is_published_corners(corners[:580]) and not is_published_corners(np.zeros((0, 3)))


def test_a_store_made_with_the_published_atlas_gives_it_back(tmp_path):
    """Resuming (``"auto"``) and inference (the store folder) on a store made with
    ``atlas="published"`` get the published atlas, though it is not copied into the store."""
    from drasclr_lib.data.patch_store import write_store_meta
    from drasclr_lib.preprocess.atlas_source import PUBLISHED_SOURCE, published_landmarks, resolve_atlas

    corners = published_landmarks()
    write_store_meta(tmp_path / "pub", corners, normalize_locations(corners), nearest_neighbors(corners, 2),
                     atlas_source=PUBLISHED_SOURCE)
    for got in (resolve_atlas(tmp_path / "pub"), resolve_atlas("auto", store=tmp_path / "pub")):
        assert got.source == PUBLISHED_SOURCE and np.array_equal(got.corners, corners)
    # the same corners from other files are not taken for the published atlas
    write_store_meta(tmp_path / "other", corners, normalize_locations(corners), nearest_neighbors(corners, 2),
                     atlas_source="mask my_atlas.nii.gz, landmarks my_landmarks.npy")
    with pytest.raises(FileNotFoundError, match="holds no saved atlas"):
        resolve_atlas(tmp_path / "other")
    with pytest.raises(ValueError, match="'published'"):
        resolve_atlas(3)


def test_cli_atlas_option(monkeypatch, tmp_path):
    from drasclr_lib.preprocess import cohort

    seen = []

    def fake(manifest, out_dir, *, atlas, **kwargs):
        seen.append(atlas)
        raise ValueError("stop here")  # the CLI reports it and returns 2

    monkeypatch.setattr(cohort, "preprocess_cohort", fake)
    base = ["--manifest", "m.csv", "--out", str(tmp_path / "store"), "--no-progress"]
    assert cohort.cli_main(base + ["--atlas", "published"]) == 2
    assert cohort.cli_main(base) == 2
    assert cohort.cli_main(base + ["--atlas-mask", "a.nii.gz", "--landmarks", "l.npy"]) == 2
    assert cohort.cli_main(base + ["--atlas-mask", "a.nii.gz"]) == 2
    assert seen == ["published", "auto", ("a.nii.gz", "l.npy"), ("a.nii.gz", None)]
    for bad in (["--atlas", "published", "--atlas-mask", "a.nii.gz"], ["--atlas", "mine"]):
        with pytest.raises(SystemExit) as exc:
            cohort.cli_main(base + bad)
        assert exc.value.code == 2
