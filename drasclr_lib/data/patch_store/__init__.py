"""The patch store: the on-disk format preprocessing writes and training, embedding, segmentation
and the viewers read. This package owns the layout; nothing else builds a path into a store.

Layout of a store folder::

    store.json            format version, patch size, atlas corners (L, 3), locations (L, 3),
                          neighbour lists (L, K), where the atlas came from
    subjects.csv          one row per completed subject: ``sid``, manifest labels, QC columns
    failures.csv          ``sid, stage, error`` for every subject that failed (may be absent)
    patches/<sid>.npy     patches_hu (L, P, P, P) int16, HU clipped to [-1024, 240]
    labels/<sid>.npy      label patches (L, P, P, P) uint8, when the manifest has a label map
    subjects/<sid>.json   per-subject record (QC, geometry, transform); written last, so its
                          presence marks the subject complete
    failures/<sid>.json   the error of a subject that failed (removed when it later succeeds)
    atlas_mask.nii.gz     the atlas the store was made with, when it was built from the cohort
    atlas_landmarks.npy   or given as files (:data:`ATLAS_MASK_FILE`, :data:`ATLAS_LANDMARKS_FILE`;
    atlas.json            :data:`ATLAS_INFO_FILE`: where an atlas built from the cohort came from)

Every file is written atomically, so a killed preprocessing run leaves complete subjects and
nothing half-written (at worst an unrenamed temporary file, see :func:`remove_stale_temps`).
Patches are memory-mapped on read: a batch of one location across many subjects touches only those patches, never whole cohorts (the published code loaded every
subject's patches of a location into RAM).

Modules (everything is importable from ``drasclr_lib.data.patch_store``):

- :mod:`~drasclr_lib.data.patch_store.layout`: file names, formats, the path of each subject file
- :mod:`~drasclr_lib.data.patch_store.records`: :class:`SubjectRecord` (``subjects/<sid>.json``),
  the ``grid_1mm`` format (:func:`image_grid`, :func:`grid_image`)
- :mod:`~drasclr_lib.data.patch_store.boxes`: patches as boxes in a volume (:func:`cut_patches`,
  :func:`paste_patches`, :func:`add_patches`)
- :mod:`~drasclr_lib.data.patch_store.writer`: writing (preprocessing, :mod:`drasclr_lib.testing`)
- :mod:`~drasclr_lib.data.patch_store.reader`: :class:`PatchStore`, :func:`patch_table`
"""

from __future__ import annotations

from drasclr_lib.data.patch_store.boxes import add_patches, cut_patches, paste_patches
from drasclr_lib.data.patch_store.layout import (ATLAS_INFO_FILE, ATLAS_LANDMARKS_FILE, ATLAS_MASK_FILE, FAILURE_COLUMNS,
                                                 FORMAT_VERSION, subject_done)
from drasclr_lib.data.patch_store.reader import PatchStore, patch_table
from drasclr_lib.data.patch_store.records import PATCH_ARRAYS, SubjectRecord, grid_image, image_grid
from drasclr_lib.data.patch_store.writer import (clear_failure, ensure_store_meta, finalize_store, record_failure,
                                                 remove_stale_temps, write_failures_table, write_store_meta,
                                                 write_subject)

__all__ = [
    "PatchStore", "SubjectRecord", "PATCH_ARRAYS", "patch_table", "FORMAT_VERSION", "FAILURE_COLUMNS",
    "ATLAS_MASK_FILE", "ATLAS_LANDMARKS_FILE", "ATLAS_INFO_FILE", "subject_done", "write_store_meta",
    "ensure_store_meta", "write_subject", "remove_stale_temps", "record_failure", "clear_failure",
    "write_failures_table", "finalize_store", "cut_patches", "paste_patches", "add_patches", "image_grid",
    "grid_image",
]
