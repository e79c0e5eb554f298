"""Data sources: manifests, the synthetic cohort, the real offline scan and the patch store."""

from drasclr_lib.data.patch_store import PatchStore, finalize_store, subject_done, write_store_meta, write_subject

__all__ = ["PatchStore", "finalize_store", "subject_done", "write_store_meta", "write_subject"]
