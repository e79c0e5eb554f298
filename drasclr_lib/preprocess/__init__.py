"""Preprocessing: from a CT file to registered atlas patches (SPEC "Preprocessing").

Modules, in pipeline order:

- :mod:`~drasclr_lib.preprocess.io`: ``read_ct`` (HU, LPS), ``read_label``, ``reorient``
- :mod:`~drasclr_lib.preprocess.resample`: ``resample_isotropic`` (1 mm, ``PAD_VOXELS`` = 60
  voxels of padding)
- :mod:`~drasclr_lib.preprocess.lung_mask`: ``segment_lungs`` (no network)
- :mod:`~drasclr_lib.preprocess.registration`: ``register_masks``, ``registration_dice``,
  ``mask_dice`` (the one mask Dice)
- :mod:`~drasclr_lib.preprocess.landmarks`: the grid rule ``atlas_landmarks``,
  ``normalize_locations``, ``nearest_neighbors``
- :mod:`~drasclr_lib.preprocess.atlas`: ``Atlas``
- :mod:`~drasclr_lib.preprocess.atlas_source`: ``resolve_atlas`` (given, saved in a store, or
  built from ``choose_reference``'s subject)
- :mod:`~drasclr_lib.preprocess.patches`: ``map_corners``, ``extract_patches`` (the box
  geometry, ``cut_patches`` / ``paste_patches``, is the store's: :mod:`drasclr_lib.data.patch_store`)
- :mod:`~drasclr_lib.preprocess.pipeline`: ``scan_to_1mm``, ``process_scan`` (one scan, all
  stages, writes nothing)
- :mod:`~drasclr_lib.preprocess.cohort`: ``preprocess_subject``, ``preprocess_cohort``
  (CLI ``drasclr preprocess``)
- :mod:`~drasclr_lib.preprocess.errors`: ``PreprocessError``

Only the atlas and landmark names are imported eagerly (NumPy and SimpleITK); every other name
is loaded on first use, so ``import drasclr_lib.preprocess`` stays light.
"""

from __future__ import annotations

import importlib

from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.preprocess.landmarks import atlas_landmarks, nearest_neighbors, normalize_locations

_LAZY = {
    "PreprocessError": "errors",
    "read_ct": "io",
    "read_label": "io",
    "reorient": "io",
    "resample_isotropic": "resample",
    "PAD_VOXELS": "resample",
    "segment_lungs": "lung_mask",
    "register_masks": "registration",
    "registration_dice": "registration",
    "mask_dice": "registration",
    "transform_to_dict": "registration",
    "transform_from_dict": "registration",
    "extract_patches": "patches",
    "map_corners": "patches",
    "resample_to_grid": "patches",
    "choose_reference": "atlas_source",
    "resolve_atlas": "atlas_source",
    "scan_to_1mm": "pipeline",
    "process_scan": "pipeline",
    "ScanPatches": "pipeline",
    "preprocess_subject": "cohort",
    "preprocess_cohort": "cohort",
}

__all__ = ["Atlas", "atlas_landmarks", "nearest_neighbors", "normalize_locations", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"drasclr_lib.preprocess.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'drasclr_lib.preprocess' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
