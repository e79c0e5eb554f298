"""Lung segmentation on small chest phantoms (and the real scan when it is cached or fetchable)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.lung_mask import lung_volume_ml, segment_lungs
from drasclr_lib.preprocess.registration import mask_dice


def make_chest_phantom(*, spacing=(1.5, 1.5, 1.5), fov_mm=(180.0, 150.0, 150.0), junction=False,
                       lungs=True, seed=0):
    """A small chest CT in LPS (identity direction) with its true lung labels.

    Body (40 HU elliptic cylinder), two ellipsoid lungs (-850 HU) holding vessels (40 HU), a
    trachea (-1000 HU) entering from the top and splitting into two main bronchi, a hollow
    scanner table (a closed box of 300 HU walls with air inside) under the back, an ECG wire
    (1500 HU) on the skin, Gaussian noise (15 HU).

    Returns:
        ``(ct, truth)``: ``sitkFloat32`` HU image and ``sitkUInt8`` labels (1 right lung at smaller
        x, 2 left lung; airways excluded, vessels included).
    """
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, dtype=float)
    size = np.round(np.asarray(fov_mm) / sp).astype(int)  # (i, j, k)
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(size[::-1], sp[::-1])], indexing="ij")
    x = i - fov_mm[0] / 2  # mm, + = patient left
    y = j - fov_mm[1] / 2 + 10  # mm, + = posterior
    z = k  # mm, + = superior
    hu = np.full(k.shape, -1000.0, dtype=np.float32)
    body = (x / 80) ** 2 + (y / 55) ** 2 <= 1
    hu[body] = 40.0
    # hollow table below the back (j grows posterior)
    tb = (np.abs(x) < 85) & (y > 60) & (y < 76)
    hu[tb] = 300.0
    hu[tb & (np.abs(x) < 82) & (y > 62) & (y < 74)] = -1000.0
    hu[(np.abs(x) < 2) & (np.abs(y + 55.5) < 1.5)] = 1500.0  # ECG wire on the anterior skin
    truth = np.zeros(k.shape, dtype=np.uint8)
    cx = 33.0 if junction else 40.0
    zc = 70.0
    if lungs:
        for label, sx in ((1, -1), (2, 1)):
            inside = ((x - sx * cx) / 32) ** 2 + ((y - 3) / 40) ** 2 + ((z - zc) / 52) ** 2 <= 1
            inside &= (x / 70) ** 2 + (y / 45) ** 2 <= 1  # a chest wall of >= 10 mm
            truth[inside] = label
        hu[truth > 0] = -850.0
        for _ in range(14):  # vessels inside the lungs
            c = np.array([rng.choice([-1, 1]) * cx + rng.uniform(-12, 12), rng.uniform(-20, 25), zc + rng.uniform(-30, 30)])
            r = rng.uniform(2.0, 3.5)
            v = (x - c[0]) ** 2 + (y - c[1]) ** 2 <= r ** 2
            v &= np.abs(z - c[2]) < 20
            hu[v & (truth > 0)] = 40.0
        # trachea from the top down to the carina, then two main bronchi to the lung centres
        carina = np.array([0.0, -8.0, zc + 25])
        airway = ((x ** 2 + (y + 8) ** 2) <= 8.0 ** 2) & (z >= carina[2])
        for sx in (-1, 1):
            end = np.array([sx * (cx - 8), 0.0, zc + 5])
            d = end - carina
            t = np.clip(((x - carina[0]) * d[0] + (y - carina[1]) * d[1] + (z - carina[2]) * d[2]) / (d @ d), 0, 1)
            dist2 = (x - carina[0] - t * d[0]) ** 2 + (y - carina[1] - t * d[1]) ** 2 + (z - carina[2] - t * d[2]) ** 2
            airway |= dist2 <= 6.0 ** 2
        hu[airway] = -1000.0
        truth[airway] = 0
    hu += rng.normal(0, 15, size=hu.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(hu)
    ct.SetSpacing(tuple(float(s) for s in sp))
    ct.SetOrigin((-100.0, -60.0, -300.0))
    lab = sitk.GetImageFromArray(truth)
    lab.CopyInformation(ct)
    return ct, lab


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(spacing=(1.0, 1.0, 1.0))  # 1 mm: exercises the 2 mm working grid


def test_phantom_lungs_labelled_by_side_with_high_dice(phantom):
    ct, truth = phantom
    mask = segment_lungs(ct, sid="P0")
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == ct.GetSize() and mask.GetSpacing() == ct.GetSpacing()
    m, t = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(truth)
    assert set(np.unique(m)) == {0, 1, 2}
    assert mask_dice(m > 0, t > 0) >= 0.95
    assert mask_dice(m == 1, t == 1) >= 0.94 and mask_dice(m == 2, t == 2) >= 0.94  # 1 = right (smaller x)


def test_trachea_and_table_excluded(phantom):
    ct, truth = phantom
    m = sitk.GetArrayFromImage(segment_lungs(ct))
    hu = sitk.GetArrayFromImage(ct)
    t = sitk.GetArrayFromImage(truth)
    top = m.shape[0] - 5  # trachea only, above the lungs
    assert not m[top].any()
    airway = (hu < -950) & (t == 0)
    airway[:, int(0.6 * m.shape[1]):, :] = False  # leave the table out of the airway count
    assert np.count_nonzero(m[airway]) < 0.1 * np.count_nonzero(airway)
    table_rows = slice(int(60 + 60 - 10) + 2, None)  # y > 60 mm at 1 mm spacing
    assert not m[:, table_rows, :].any()


def test_vessels_filled(phantom):
    ct, truth = phantom
    m = sitk.GetArrayFromImage(segment_lungs(ct))
    hu, t = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(truth)
    vessel = (t > 0) & (hu > -320)
    vessel = vessel & ~np.roll(t == 0, 3, axis=2) & ~np.roll(t == 0, -3, axis=2)  # away from the border
    assert vessel.sum() > 100
    assert np.mean(m[vessel] > 0) > 0.9


def test_touching_lungs_are_split():
    ct, truth = make_chest_phantom(junction=True, seed=1)
    t = sitk.GetArrayFromImage(truth)
    m = sitk.GetArrayFromImage(segment_lungs(ct))
    assert mask_dice(m == 1, t == 1) >= 0.9 and mask_dice(m == 2, t == 2) >= 0.9


def test_coarse_input_and_volume():
    ct, truth = make_chest_phantom(spacing=(2.5, 2.5, 3.0), seed=2)
    mask = segment_lungs(ct)
    assert abs(lung_volume_ml(mask) - lung_volume_ml(truth)) < 0.08 * lung_volume_ml(truth)


def test_no_lungs_raises_with_sid():
    ct, _ = make_chest_phantom(lungs=False, seed=3)
    with pytest.raises(PreprocessError) as info:
        segment_lungs(ct, sid="ABD-01")
    assert info.value.stage == "lung_mask" and info.value.sid == "ABD-01"
    assert "no lungs" in str(info.value) and "ABD-01" in str(info.value)


def test_synthetic_subject_dice():
    """One small generated subject (drasclr_lib.data.synthetic), through read -> 1 mm -> mask."""
    synthetic = pytest.importorskip("drasclr_lib.data.synthetic")
    import tempfile
    from pathlib import Path

    import pandas as pd

    from drasclr_lib.preprocess.io import read_ct, read_label
    from drasclr_lib.preprocess.resample import resample_isotropic

    with tempfile.TemporaryDirectory() as tmp:
        man = synthetic.make_cohort(tmp, 1, seed=3, size=0.45, spacing=(1.6, 1.6, 2.5), workers=1, progress=False)
        row = pd.read_csv(man).iloc[0]
        img = read_ct(Path(tmp) / row.image, sid=row.sid)
        ct = resample_isotropic(img, 1.0, pad=10)
        m = sitk.GetArrayFromImage(segment_lungs(ct, sid=row.sid))
        gt = sitk.GetArrayFromImage(resample_isotropic(read_label(Path(tmp) / row.lung_mask, img),
                                                       interpolator="nearest", pad=10))
    assert mask_dice(m > 0, gt > 0) >= 0.95
    assert mask_dice(m == 1, gt == 1) >= 0.93 and mask_dice(m == 2, gt == 2) >= 0.93


def test_real_scan_lung_volume_plausible():
    """The real Lung-PET-CT-Dx scan (512x512x64, 5 mm, table, partial coverage) at native resolution."""
    real = pytest.importorskip("drasclr_lib.data.real")
    try:
        manifest = real.fetch_lung_pet_ct_dx()
    except Exception as err:  # no network and no cache
        pytest.skip(f"real scan not available: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    import pandas as pd

    from drasclr_lib.preprocess.io import read_ct

    row = pd.read_csv(manifest).iloc[0]
    ct = read_ct(row.image, sid=row.sid)
    mask = segment_lungs(ct, sid=row.sid)
    m = sitk.GetArrayViewFromImage(mask)
    right, left = [np.count_nonzero(m == l) * np.prod(ct.GetSpacing()) / 1e6 for l in (1, 2)]  # litres
    assert 3.0 <= right + left <= 8.0, (right, left)
    assert right > left > 0.6 * right  # the right lung is the larger one
    # the lungs are not touching the table or outside the body: every lung voxel is below -320 HU
    # or enclosed (vessels), and no lung voxel lies in the bottom 15% of rows (table)
    assert not m[:, int(0.85 * m.shape[1]):, :].any()
