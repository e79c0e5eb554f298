"""Data sources: manifests, the synthetic cohort, the real offline scan and the patch store."""

from drasclr_lib.data.manifest import ManifestError
from drasclr_lib.data.patch_store import PatchStore, finalize_store, subject_done, write_store_meta, write_subject
from drasclr_lib.data.real import fetch_lung_pet_ct_dx
from drasclr_lib.data.sources import read_manifest, resolve_manifest

__all__ = [
    "ManifestError",
    "PatchStore",
    "fetch_lung_pet_ct_dx",
    "finalize_store",
    "read_manifest",
    "resolve_manifest",
    "subject_done",
    "write_store_meta",
    "write_subject",
]
