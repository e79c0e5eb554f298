"""Which atlas a run uses: the published one shipped with the package, given files, the one saved
in a patch store, or one built from the cohort's reference subject.

:func:`resolve_atlas` is the one resolver: the cohort runner (``preprocess_cohort``, notebook 01)
and whole-scan inference (``segment_scan``) both call it. ``atlas="published"`` is the atlas of
the DrasCLR release (github.com/batmanlab/DrasCLR v1.0, MIT, Copyright (c) 2023 batmanlab): its
lung mask and 581 landmarks ship as package data in ``drasclr_lib/data/published_atlas/`` (with
their ``NOTICE``), found with :mod:`importlib.resources` (:func:`published_atlas_files`); the
released checkpoint's location inputs mean something only on these 581 locations
(:func:`is_published_corners` tells a store built on them). An atlas built from the cohort
(:func:`choose_reference`'s subject, :meth:`Atlas.from_subject`) is saved in the store under the
store's atlas file names (:data:`~drasclr_lib.data.patch_store.ATLAS_MASK_FILE`,
:data:`~drasclr_lib.data.patch_store.ATLAS_LANDMARKS_FILE`,
:data:`~drasclr_lib.data.patch_store.ATLAS_INFO_FILE`), so resumed and sharded runs, and
inference on a model trained on that store, reuse the very same atlas.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from drasclr_lib.data.patch_store import ATLAS_INFO_FILE, ATLAS_LANDMARKS_FILE, ATLAS_MASK_FILE, PatchStore
from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.pipeline import manifest_files
from drasclr_lib.preprocess.resample import PAD_VOXELS
from drasclr_lib.utils import load_json, save_json

__all__ = ["resolve_atlas", "saved_atlas", "choose_reference", "REFERENCE_TRIES", "PUBLISHED", "PUBLISHED_SOURCE",
           "PUBLISHED_NUM_LOCATIONS", "published_atlas_files", "published_landmarks", "published_atlas",
           "is_published_corners"]

#: How many reference subjects an automatic atlas tries before giving up.
REFERENCE_TRIES = 3

#: The ``atlas`` argument (and ``drasclr preprocess --atlas``) choosing the published atlas.
PUBLISHED = "published"
#: ``Atlas.source`` of the published atlas (kept in ``store.json`` as ``atlas_source``).
PUBLISHED_SOURCE = ("published DrasCLR atlas (github.com/batmanlab/DrasCLR v1.0, MIT, Copyright (c) 2023 batmanlab): "
                    "atlas_lung_mask.nii.gz + atlas_patch_loc.npy, 581 landmarks")
#: Number of landmarks of the published atlas.
PUBLISHED_NUM_LOCATIONS = 581
_PUBLISHED_FILES = ("atlas_lung_mask.nii.gz", "atlas_patch_loc.npy", "NOTICE")


def _published_resources() -> tuple:
    """The packaged files (``importlib.resources`` traversables): mask, landmarks, notice.

    Raises:
        FileNotFoundError: naming the folder when the installation lacks one of them.
    """
    folder = resources.files("drasclr_lib") / "data" / "published_atlas"
    found = tuple(folder / name for name in _PUBLISHED_FILES)
    missing = [name for name, f in zip(_PUBLISHED_FILES, found) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"the published atlas is not installed: {', '.join(missing)} missing from {folder} "
                                "(package data of drasclr_lib; reinstall the package)")
    return found


def published_atlas_files() -> dict[str, Path]:
    """Paths of the published atlas shipped with the package.

    Returns:
        ``{"mask": atlas_lung_mask.nii.gz, "landmarks": atlas_patch_loc.npy, "notice": NOTICE}``
        (the notice holds the attribution and the MIT text).

    Raises:
        FileNotFoundError: when the package data is missing, or the package is installed in a
            form without real files (a zip); :func:`published_atlas` works there too.
    """
    found = _published_resources()
    if not all(isinstance(f, Path) for f in found):
        raise FileNotFoundError(f"the published atlas files of this installation are not plain files ({found[0]}); "
                                "use published_atlas() / published_landmarks(), which read them anyway")
    return dict(zip(("mask", "landmarks", "notice"), found))


def published_landmarks() -> np.ndarray:
    """(581, 3) int64 corners of the published atlas (``atlas_patch_loc.npy``: (i, j, k) voxel
    corners of 32³ patches in the published mask file's voxel order)."""
    with resources.as_file(_published_resources()[1]) as path:
        return np.load(path, allow_pickle=False).astype(np.int64)


def published_atlas() -> Atlas:
    """The published DrasCLR atlas: its lung mask (387 x 387 x 319 voxels at 1 mm, reoriented like
    the subjects) and its 581 landmarks, with ``source`` :data:`PUBLISHED_SOURCE`.

    Raises:
        FileNotFoundError: when the package data is missing.
    """
    mask, landmarks, _ = _published_resources()
    with ExitStack() as stack:
        out = Atlas.from_files(stack.enter_context(resources.as_file(mask)),
                               stack.enter_context(resources.as_file(landmarks)))
    out.source = PUBLISHED_SOURCE
    return out


def is_published_corners(corners) -> bool:
    """Whether ``corners`` ((L, 3) atlas corners, e.g. a store's ``atlas_corners``) are exactly the
    published 581 landmarks, in their order (what the released checkpoint's locations mean)."""
    corners = np.asarray(corners)
    return corners.shape == (PUBLISHED_NUM_LOCATIONS, 3) and np.array_equal(corners, published_landmarks())


def resolve_atlas(atlas, *, store: str | os.PathLike | PatchStore | None = None, manifest=None,
                  segment: bool = False, pad: int = PAD_VOXELS) -> Atlas:
    """Turn an ``atlas`` argument into an :class:`Atlas`.

    Args:
        atlas: one of
            - ``"published"``: the published DrasCLR atlas shipped with the package
              (:func:`published_atlas`; 581 landmarks, the locations of the released weights);
            - an :class:`Atlas` (returned as is);
            - a ``(mask_path, landmarks_path or None)`` pair (``Atlas.from_files``);
            - a mask file (the grid rule places the landmarks);
            - a patch store folder or :class:`PatchStore`: the atlas saved in it (checked against
              its ``store.json``), or the published atlas for a store made with it;
            - ``"auto"`` or ``None``: the atlas saved in ``store`` by an earlier run (the
              published one for a store made with it), else one built from ``manifest``'s
              reference subject (:func:`choose_reference`; when that subject cannot be read or
              segmented, the reference among the others, up to :data:`REFERENCE_TRIES` tries) and
              saved in ``store``.
            A folder literally named ``published`` needs ``"./published"``.
        store: for ``"auto"``: the store folder the atlas is saved in.
        manifest: for ``"auto"``: the cohort (manifest DataFrame with ``sid``, ``image``,
            optional ``lung_mask``).
        segment: for ``"auto"``: segment the reference subject even when it has a mask.
        pad: for ``"auto"``: padding of the reference subject's 1 mm volume.

    Raises:
        FileNotFoundError: for a store folder without its saved atlas (``"auto"`` without a
            ``manifest`` included), or missing atlas files.
        ValueError: for anything else as ``atlas``, ``"auto"`` without ``store``, or a saved atlas
            whose landmarks differ from its store's ``atlas_corners``.
        PreprocessError: when no reference subject gives an atlas.
    """
    if isinstance(atlas, Atlas):
        return atlas
    if isinstance(atlas, str) and atlas.strip().lower() == PUBLISHED:
        return published_atlas()
    if isinstance(atlas, (str, os.PathLike)) and str(atlas) == "auto":
        atlas = None
    if isinstance(atlas, (tuple, list)):
        mask, landmarks = (list(atlas) + [None])[:2]
        return Atlas.from_files(mask, landmarks)
    if isinstance(atlas, PatchStore) or (isinstance(atlas, (str, os.PathLike)) and Path(atlas).is_dir()):
        root = atlas.root if isinstance(atlas, PatchStore) else Path(atlas)
        found = saved_atlas(root)
        if found is None and _made_with_published(root):
            return published_atlas()
        if found is None:
            raise FileNotFoundError(f"{root} holds no saved atlas ({ATLAS_MASK_FILE} + {ATLAS_LANDMARKS_FILE}); give "
                                    "the atlas the store was made with as Atlas or (mask, landmarks)")
        return found
    if isinstance(atlas, (str, os.PathLike)):
        return Atlas.from_files(atlas)
    if atlas is not None:
        raise ValueError(f"atlas must be None, 'auto', 'published', an Atlas, a store folder or "
                         f"(mask_path, landmarks_path), got {atlas!r}")
    if store is None:
        raise ValueError("atlas='auto' needs the store folder the atlas is saved in (store=...)")
    root = store.root if isinstance(store, PatchStore) else Path(store)
    found = saved_atlas(root)
    if found is not None:
        return found
    if _made_with_published(root):  # resuming a store made with atlas="published"
        return published_atlas()
    if manifest is None:
        raise FileNotFoundError(f"{root} holds no saved atlas and no manifest was given to build one from")
    return _reference_atlas(manifest, root, segment=segment, pad=pad)


def _made_with_published(root: Path) -> bool:
    """Whether the store folder ``root`` was made with ``atlas="published"`` (its ``store.json``
    names the published atlas as its source and lists the published landmarks)."""
    meta = root / "store.json"
    if not meta.exists():
        return False
    info = load_json(meta)
    return info.get("atlas_source") == PUBLISHED_SOURCE and is_published_corners(info.get("atlas_corners", []))


def saved_atlas(root: str | os.PathLike) -> Atlas | None:
    """The atlas saved in a store folder, with its ``source`` from ``atlas.json``; ``None`` when
    the folder holds none.

    Raises:
        ValueError: when the folder's ``store.json`` lists other atlas corners than the saved
            landmarks.
    """
    root = Path(root)
    mask, landmarks, info = root / ATLAS_MASK_FILE, root / ATLAS_LANDMARKS_FILE, root / ATLAS_INFO_FILE
    if not (mask.exists() and landmarks.exists()):
        return None
    out = Atlas.from_files(mask, landmarks)
    if info.exists():
        out.source = load_json(info).get("source", out.source)
    meta = root / "store.json"
    if meta.exists() and not np.array_equal(np.asarray(load_json(meta)["atlas_corners"]), out.corners):
        raise ValueError(f"{root}: the saved atlas landmarks differ from the store's atlas_corners")
    return out


def _reference_atlas(manifest_df, root: Path, *, segment: bool, pad: int) -> Atlas:
    """Build the atlas from the cohort's reference subject (the next one when it fails) and save it."""
    df = manifest_df.copy()
    df["sid"] = df["sid"].astype(str)
    tried: list[str] = []
    while True:
        candidates = df.loc[~df["sid"].isin(tried)]
        ref = choose_reference(candidates)
        files = manifest_files(candidates.loc[candidates["sid"] == ref].iloc[0])
        try:
            built = Atlas.from_subject(files["image"], None if segment else files["lung_mask"], sid=ref, pad=int(pad))
            break
        except (PreprocessError, ValueError) as err:
            tried.append(ref)
            if len(tried) >= REFERENCE_TRIES or len(tried) >= len(df):
                raise PreprocessError(f"no atlas could be built from the reference subjects {tried}; last error: {err}",
                                      stage=getattr(err, "stage", "lung_mask"), sid=ref) from err
    built.source = f"reference subject {ref} (median lung volume, choose_reference)"
    built.save(root)
    save_json({"source": built.source, "reference_sid": ref}, root / ATLAS_INFO_FILE)
    return built


def choose_reference(manifest_df) -> str:
    """The subject an atlas built from the cohort is made from (documented default).

    Rule: the subject whose lung volume is the cohort median (the lower median for an even
    count; ties by sorted ``sid``), so the atlas is neither a small nor a large lung. Lung
    volumes come from the manifest's ``lung_mask`` files when the column is filled (count of
    nonzero voxels times voxel volume, read from the mask files only; only subjects with a
    readable mask are candidates).
    Without masks the same rule uses the scanned volume of each image (size times spacing, read
    from the file headers only, no pixel data), a cheap stand-in that avoids segmenting the
    whole cohort before it is processed.

    Args:
        manifest_df: manifest DataFrame with ``sid`` and ``image`` (optional ``lung_mask``).

    Returns:
        The chosen ``sid``.

    Raises:
        ValueError: for an empty manifest.
    """
    df = manifest_df.copy()
    if len(df) == 0:
        raise ValueError("choose_reference: the manifest is empty")
    df["sid"] = df["sid"].astype(str)
    df = df.sort_values("sid").reset_index(drop=True)
    volumes = []
    use_masks = "lung_mask" in df.columns and df["lung_mask"].notna().any()
    for _, row in df.iterrows():
        try:
            if use_masks:
                if not isinstance(row["lung_mask"], str) or not row["lung_mask"].strip():
                    raise ValueError("no lung mask")  # candidates are the subjects with a mask
                m = sitk.ReadImage(str(row["lung_mask"]))
                vox = float(np.prod(m.GetSpacing()))
                volumes.append(float(np.count_nonzero(sitk.GetArrayViewFromImage(m))) * vox)
            else:
                path = Path(str(row["image"]))
                reader = sitk.ImageFileReader()
                if path.is_dir():
                    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
                    reader.SetFileName(files[0])
                    reader.ReadImageInformation()
                    size = list(reader.GetSize())[:2] + [len(files)]
                else:
                    reader.SetFileName(str(path))
                    reader.ReadImageInformation()
                    size = list(reader.GetSize())
                volumes.append(float(np.prod(size[:3]) * np.prod(reader.GetSpacing()[:3])))
        except Exception:  # noqa: BLE001 - an unreadable subject is never the reference
            volumes.append(np.nan)
    vol = np.asarray(volumes)
    ok = np.flatnonzero(np.isfinite(vol))
    if len(ok) == 0:
        return str(df["sid"].iloc[0])
    order = ok[np.argsort(vol[ok], kind="stable")]
    return str(df["sid"].iloc[order[(len(order) - 1) // 2]])
