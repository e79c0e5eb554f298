"""Isotropic resampling: grid covers the input extent plus padding, values preserved."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from drasclr_lib.preprocess.resample import isotropic_grid, resample_isotropic


def ramp_image(spacing=(0.8, 0.8, 2.5), size=(40, 30, 12)):
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    arr = (i * spacing[0] * 3.0 + j * spacing[1] * 2.0 - k * spacing[2] * 1.5).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 5.0))
    return img


def test_grid_covers_extent_with_padding():
    img = ramp_image()
    out = resample_isotropic(img, 1.0, pad=5)
    assert out.GetSpacing() == (1.0, 1.0, 1.0) and out.GetDirection() == img.GetDirection()
    extent = (np.array(img.GetSize()) - 1) * np.array(img.GetSpacing())
    assert list(out.GetSize()) == [int(np.floor(e + 1e-6)) + 1 + 10 for e in extent]
    np.testing.assert_allclose(out.GetOrigin(), np.array(img.GetOrigin()) - 5.0)
    arr = sitk.GetArrayViewFromImage(out)
    # padding value wherever a voxel is more than half an input voxel outside the input
    # (ITK extends the image by half a voxel at its border: z spacing 2.5 -> 1.25 mm)
    assert np.all(arr[:3] == -1024) and np.all(arr[:, :, -5:] == -1024) and np.all(arr[:, -5:] == -1024)
    assert not np.any(arr[5:-5, 5:-5, 5:-5] == -1024)
    assert out.GetPixelID() == sitk.sitkFloat32


@pytest.mark.parametrize("interp", ["bspline", "linear"])
def test_linear_field_is_reproduced(interp):
    img = ramp_image()
    out = resample_isotropic(img, 1.0, interpolator=interp, pad=0)
    # a linear function of physical position is reproduced exactly inside the input
    k, j, i = np.meshgrid(*[np.arange(n) for n in out.GetSize()[::-1]], indexing="ij")
    x = out.GetOrigin()[0] + i - img.GetOrigin()[0]
    y = out.GetOrigin()[1] + j - img.GetOrigin()[1]
    z = out.GetOrigin()[2] + k - img.GetOrigin()[2]
    expect = 3.0 * x + 2.0 * y - 1.5 * z
    inner = (slice(3, -3), slice(3, -3), slice(3, -3))
    # linear: exact; cubic B-spline: exact in the interior, small mirror-boundary error near the edge
    atol = 0.05 if interp == "linear" else 0.25
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(out)[inner], expect[inner], atol=atol)


def test_nearest_keeps_labels_and_type():
    lab = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 3, size=(8, 10, 12)).astype(np.uint8))
    lab.SetSpacing((1.7, 1.3, 3.0))
    out = resample_isotropic(lab, 1.0, interpolator="nearest", pad=4)
    assert out.GetPixelID() == sitk.sitkUInt8
    arr = sitk.GetArrayViewFromImage(out)
    assert set(np.unique(arr)) <= {0, 1, 2} and np.all(arr[:2] == 0)  # > half a 3 mm voxel outside


def test_isotropic_grid_validates():
    img = ramp_image()
    with pytest.raises(ValueError):
        isotropic_grid(img, 0.0)
    with pytest.raises(ValueError):
        isotropic_grid(img, 1.0, pad=-1)
    with pytest.raises(ValueError):
        resample_isotropic(img, 1.0, interpolator="cubic")
