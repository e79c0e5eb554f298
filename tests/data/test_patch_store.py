"""The patch store's layout and records: SubjectRecord, atomic subject writes, failure rows,
stale temporary files, store.json, the reading accessors, patch pasting, and patch_table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import drasclr_lib.data.patch_store.writer as ps_writer
from drasclr_lib.data.patch_store import (PatchStore, SubjectRecord, clear_failure, ensure_store_meta, finalize_store,
                                          patch_table, record_failure, remove_stale_temps, subject_done,
                                          write_failures_table, write_store_meta, write_subject)
from drasclr_lib.data.patch_store import add_patches, cut_patches, paste_patches

CORNERS = np.array([[0, 0, 0], [26, 0, 0], [0, 26, 0]])


def _store(root, corners=CORNERS, patch_size=4):
    L = len(corners)
    write_store_meta(root, corners, np.zeros((L, 3)), np.zeros((L, 1), int), patch_size=patch_size)
    return root


def _full_record(sid="s1", L=3) -> dict:
    """A record as preprocessing writes it (the file's JSON form)."""
    return {
        "sid": sid, "num_locations": L, "image": f"/data/{sid}.nii.gz", "lung_volume_l": 4.2, "laa950": 7.5,
        "reg_dice": 0.91, "mask_dice": float("nan"), "mask_source": "manifest", "qc_pass": True,
        "mean_patch_inside": 0.97, "corners_subject": [[1, 2, 3], [27, 2, 3], [1, 28, 3]][:L],
        "patch_lung_fraction": [0.5, None, 1.0][:L], "patch_emph_fraction": [0.1, 0.0, None][:L],
        "patch_lobe": [1, 4, 0][:L], "patch_laa950": [None, 3.0, 12.5][:L],
        "grid_1mm": {"origin": [-10.0, -20.0, -30.0], "spacing": [1.0, 1.0, 1.0],
                     "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], "size": [40, 36, 32]},
        "transform": {"type": "AffineTransform", "parameters": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0, 2.0, 0, 0],
                      "fixed_parameters": [0.0, 0.0, 0.0]},
        "registration": {"metric": -0.5, "iterations": 40, "converged": True},
        "operator": "kept as read",
        "time_read_s": 1.5, "time_register_s": 4.0,
    }


# -- SubjectRecord -----------------------------------------------------------------------------
def test_record_round_trip_is_identical():
    data = _full_record()
    rec = SubjectRecord.from_dict(data)
    assert rec.sid == "s1" and rec.num_locations == 3 and rec.times == {"read": 1.5, "register": 4.0}
    assert rec.extra == {"operator": "kept as read"}
    assert json.dumps(rec.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)  # NaN scalars too
    again = SubjectRecord.from_dict(rec.to_dict())
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)


def test_record_nan_and_none():
    rec = SubjectRecord.from_dict(_full_record())
    # None in the file -> NaN in the arrays (float64); NaN -> None when written back
    assert rec.patch_lung_fraction.dtype == np.float64 and np.isnan(rec.patch_lung_fraction[1])
    np.testing.assert_array_equal(rec.patch_laa950[1:], [3.0, 12.5])
    assert rec.to_dict()["patch_lung_fraction"] == [0.5, None, 1.0]
    assert rec.patch_lobe.dtype == np.int64 and rec.patch_lobe.tolist() == [1, 4, 0]
    assert rec.corners_subject.dtype == np.int64 and rec.corners_subject.shape == (3, 3)
    built = SubjectRecord(sid="s2", num_locations=2, patch_emph_fraction=np.array([np.nan, 0.25]))
    assert built.to_dict() == {"sid": "s2", "num_locations": 2, "patch_emph_fraction": [None, 0.25]}
    flat = rec.flat()
    assert flat["reg_dice"] == 0.91 and flat["time_read_s"] == 1.5 and "corners_subject" not in flat
    assert math.isnan(flat["mask_dice"])


def test_record_refuses_wrong_lengths():
    for key, bad in (("patch_lobe", [1, 2]), ("patch_lung_fraction", [0.1] * 4), ("corners_subject", [[0, 0, 0]])):
        with pytest.raises(ValueError, match=f"s1.*{key}"):
            SubjectRecord.from_dict({**_full_record(), key: bad})


def test_wrong_length_refused_at_write_and_at_read(tmp_path):
    root = _store(tmp_path / "bad", CORNERS[:2])
    with pytest.raises(ValueError, match="s1.*patch_lobe"):  # refused when written
        write_subject(root, "s1", np.zeros((2, 4, 4, 4)), record={"patch_lobe": [1, 2, 3]})
    assert not subject_done(root, "s1") and not (root / "patches" / "s1.npy").exists()
    write_subject(root, "s1", np.zeros((2, 4, 4, 4)), record={"patch_lobe": [1, 2]})
    path = root / "subjects" / "s1.json"  # a record edited by hand
    path.write_text(json.dumps({**json.loads(path.read_text()), "patch_lobe": [1, 2, 3]}))
    with pytest.raises(ValueError, match="s1.*patch_lobe.*s1.json"):  # names the sid, the key and the file
        PatchStore(root).record("s1")


# -- writing a subject ---------------------------------------------------------------------------
def test_write_subject_files_and_completion_marker(tmp_path):
    root = _store(tmp_path / "st")
    hu = np.full((3, 4, 4, 4), -2000.0)
    hu[1] = 500.0
    assert not subject_done(root, "s1")
    write_subject(root, "s1", hu, label_patches=np.ones((3, 4, 4, 4), np.int64), record=_full_record())
    assert subject_done(root, "s1")
    patches = np.load(root / "patches" / "s1.npy")
    assert patches.dtype == np.int16 and patches[0].min() == -1024 and patches[1].max() == 240  # clipped
    assert np.load(root / "labels" / "s1.npy").dtype == np.uint8
    on_disk = json.loads((root / "subjects" / "s1.json").read_text())
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(_full_record(), sort_keys=True)
    with pytest.raises(ValueError, match="s2.*label patches"):
        write_subject(root, "s2", hu, label_patches=np.ones((3, 2, 2, 2)))
    with pytest.raises(ValueError, match="s2.*3 patches"):
        write_subject(root, "s2", hu, record=SubjectRecord(sid="s2", num_locations=2))
    assert not (root / "patches" / "s2.npy").exists()  # checked before anything is written


def test_record_goes_last_and_an_interrupted_write_leaves_no_subject(tmp_path, monkeypatch):
    root = _store(tmp_path / "st")

    def dying(obj, path):
        raise KeyboardInterrupt("killed while writing the record")

    monkeypatch.setattr(ps_writer, "save_json", dying)
    with pytest.raises(KeyboardInterrupt):
        write_subject(root, "s1", np.zeros((3, 4, 4, 4)), record={"laa950": 1.0})
    assert (root / "patches" / "s1.npy").exists() and not subject_done(root, "s1")  # patches first, record last
    assert not list(root.rglob(".*part*"))  # the atomic write removed its temporary file
    monkeypatch.undo()
    finalize_store(root)
    assert PatchStore(root).sids == []


def test_remove_stale_temps_only_of_that_subject(tmp_path):
    root = tmp_path / "st"
    stale = [root / "patches" / ".s1.abc.part.npy", root / "labels" / ".s1.x1.part.npy",
             root / "subjects" / ".s1.q.part.json"]
    keep = [root / "subjects" / ".s10.q.part.json", root / "patches" / "s1.npy", root / "patches" / ".s2.z.part.npy"]
    for p in stale + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    remove_stale_temps(root, "s1")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    remove_stale_temps(tmp_path / "absent", "s1")  # nothing to clean: no error


# -- failures --------------------------------------------------------------------------------------
def test_failures_recorded_gathered_and_cleared(tmp_path):
    root = _store(tmp_path / "st")
    assert PatchStore(root).failures().columns.tolist() == ["sid", "stage", "error"]
    record_failure(root, "s2", "read", "[read] subject 's2': file or folder not found")
    record_failure(root, "s1", "register", "[register] subject 's1': SimpleITK registration failed")
    record_failure(root, "s3", "lung_mask", "no lungs")
    table = write_failures_table(root)
    assert table["sid"].tolist() == ["s1", "s2", "s3"]  # sorted
    s2 = table.set_index("sid").loc["s2"]
    assert s2["stage"] == "read" and "not found" in s2["error"]
    back = PatchStore(root).failures()
    assert back.values.tolist() == table.values.tolist()
    # s1 succeeds on a later run (its failure file stays until the table is gathered), s3's is cleared
    write_subject(root, "s1", np.zeros((3, 4, 4, 4)))
    clear_failure(root, "s3")
    clear_failure(root, "s3")  # twice: no error
    table = write_failures_table(root)
    assert table["sid"].tolist() == ["s2"]
    assert sorted(p.name for p in (root / "failures").iterdir()) == ["s2.json"]
    assert PatchStore(root).failures()["sid"].tolist() == ["s2"]


def test_empty_failures_table_is_written(tmp_path):
    root = tmp_path / "st"
    root.mkdir()
    assert len(write_failures_table(root)) == 0
    assert (root / "failures.csv").read_text().strip() == "sid,stage,error"


def test_ensure_store_meta_refuses_another_atlas(tmp_path):
    root = tmp_path / "st"
    locs, nb = np.zeros((3, 3)), np.zeros((3, 1), int)
    ensure_store_meta(root, CORNERS, locs, nb, patch_size=4, atlas_source="first")
    first = (root / "store.json").read_text()
    ensure_store_meta(root, CORNERS, locs, nb, patch_size=4, atlas_source="second")  # same corners: kept
    assert (root / "store.json").read_text() == first
    with pytest.raises(ValueError, match="another atlas.*first"):
        ensure_store_meta(root, CORNERS + 1, locs, nb, patch_size=4, atlas_source="third")


# -- reading accessors ------------------------------------------------------------------------------
def test_corners_grid_and_patch_values(tmp_path):
    root = _store(tmp_path / "st")
    write_subject(root, "s1", np.zeros((3, 4, 4, 4)), record=_full_record())
    write_subject(root, "s2", np.zeros((3, 4, 4, 4)), record={"laa950": 3.0})  # not from preprocessing
    finalize_store(root)
    store = PatchStore(root)
    np.testing.assert_array_equal(store.corners("s1"), _full_record()["corners_subject"])
    np.testing.assert_array_equal(store.corners("s1", atlas_fallback=True), _full_record()["corners_subject"])
    np.testing.assert_array_equal(store.corners("s2", atlas_fallback=True), CORNERS)
    with pytest.raises(ValueError, match="s2.*corners_subject"):
        store.corners("s2")
    grid = store.subject_grid("s1")
    g = _full_record()["grid_1mm"]
    assert list(grid.GetSize()) == g["size"]
    np.testing.assert_allclose(grid.GetOrigin(), g["origin"])
    np.testing.assert_allclose(grid.GetSpacing(), g["spacing"])
    np.testing.assert_allclose(grid.GetDirection(), g["direction"])
    with pytest.raises(ValueError, match="s2.*grid_1mm"):
        store.subject_grid(1)
    lung = store.patch_values("s1", "patch_lung_fraction")
    np.testing.assert_array_equal(lung, [0.5, np.nan, 1.0])
    assert store.patch_values(0, "patch_lobe").tolist() == [1, 4, 0]
    assert store.patch_values("s2", "patch_lobe") is None
    with pytest.raises(KeyError):
        store.patch_values("s1", "laa950")


# -- pasting patches back ---------------------------------------------------------------------------
def test_paste_is_the_inverse_of_cut():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 200, size=(9, 10, 11)).astype(np.int16)  # (k, j, i)
    corners = np.array([[0, 0, 0], [6, 5, 4], [-2, 7, 6], [8, -3, 7]])  # (i, j, k), two past the borders
    P = 4
    patches, inside = cut_patches(vol, corners, P, -1024)
    m = 8  # independent of the shared box geometry: slices of the volume padded with the fill value
    padded = np.pad(vol, m, constant_values=-1024)
    for n, (i, j, k) in enumerate(corners):
        np.testing.assert_array_equal(patches[n], padded[k + m:k + m + P, j + m:j + m + P, i + m:i + m + P])
    back = paste_patches(patches, corners, vol.shape, fill=7)
    covered = np.zeros(vol.shape, bool)
    for i, j, k in corners:
        covered[max(k, 0):k + P, max(j, 0):j + P, max(i, 0):i + P] = True
    np.testing.assert_array_equal(back[covered], vol[covered])  # the volume again inside the patches
    assert (back[~covered] == 7).all()
    assert back.dtype == np.int16 and inside[0] == 1.0 and inside[2] == 2 * 3 * 3 / P**3  # i, j, k clipped
    # the corner offset matters: the same patches pasted one voxel further along i differ
    shifted = paste_patches(patches, corners + [1, 0, 0], vol.shape, fill=7)
    assert not np.array_equal(shifted[covered], vol[covered])
    # leading channels and a box of a larger grid (corners relative to the box)
    two = paste_patches(np.stack([patches, -patches], axis=1), corners[:2] - [1, 1, 1], (5, 6, 7), dtype=np.int32)
    assert two.shape == (2, 5, 6, 7) and two.dtype == np.int32
    np.testing.assert_array_equal(two[0], paste_patches(patches[:2], corners[:2] - [1, 1, 1], (5, 6, 7)))
    np.testing.assert_array_equal(two[1], -two[0])


def test_paste_clips_at_borders_and_later_patches_win():
    P = 3
    patches = np.stack([np.full((P, P, P), v, np.float32) for v in (1, 2, 3)])
    corners = np.array([[-1, 0, 0], [1, 0, 0], [5, 0, 0]])  # i: [-1, 2), [1, 4), [5, 8) on a size-6 axis
    vol = paste_patches(patches, corners, (3, 3, 6))
    np.testing.assert_array_equal(vol[0, 0], [1, 2, 2, 2, 0, 3])  # overlap at i = 1: the later patch
    vol = paste_patches(patches[::-1], corners[::-1], (3, 3, 6))
    np.testing.assert_array_equal(vol[0, 0], [1, 1, 2, 2, 0, 3])
    # the clipped part is the part outside: a patch numbering its voxels along i (10 n + i)
    ramp = (10 * np.arange(3)[:, None, None, None] + np.arange(P)).astype(np.float32) * np.ones((3, P, P, P))
    vol = paste_patches(ramp, corners, (3, 3, 6), fill=-1)
    np.testing.assert_array_equal(vol[0, 0], [1, 10, 11, 12, -1, 20])  # patch 0 from its i = 1, patch 2 up to i = 0
    assert paste_patches(patches, np.array([[9, 9, 9]] * 3), (3, 3, 6)).sum() == 0  # all outside: dropped


def test_add_patches_sums_and_counts():
    P = 3
    patches = np.stack([np.full((2, P, P, P), v, np.float32) for v in (1, 2, 3)])  # (L, C, P, P, P)
    corners = np.array([[-1, 0, 0], [1, 0, 0], [5, 0, 0]])
    total = np.zeros((2, 3, 3, 6), np.float32)
    counts = np.zeros((3, 3, 6), np.uint16)
    add_patches(total, counts, patches, corners)
    np.testing.assert_array_equal(total[0, 0, 0], [1, 3, 2, 2, 0, 3])
    np.testing.assert_array_equal(counts[0, 0], [1, 2, 1, 1, 0, 1])
    add_patches(total, None, patches[:1], corners[:1])  # counts optional
    np.testing.assert_array_equal(total[1, 2, 2], [2, 4, 2, 2, 0, 3])
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(6, 7, 8))
    cs = np.array([[0, 0, 0], [2, 1, 3], [5, 4, 2]])
    cut = cut_patches(vol, cs, 4, 0.0)[0]
    tot, cnt = np.zeros_like(vol), np.zeros(vol.shape, np.int64)
    add_patches(tot, cnt, cut, cs)  # the mean of the cut patches pasted back is the volume where covered
    np.testing.assert_allclose(tot[cnt > 0] / cnt[cnt > 0], vol[cnt > 0])


# -- patch_table ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from drasclr_lib.testing import make_toy_store

    return PatchStore(make_toy_store(tmp_path_factory.mktemp("toy"), n_subjects=5, grid=(2, 2, 2)))


def test_patch_table_from_labels_and_records(toy, tmp_path):
    store = toy
    tab = patch_table(store)
    N, L = store.num_subjects, store.num_locations
    assert all(v.shape == (N, L) for v in tab.values())
    want = np.stack([(np.asarray(store.label_patches(s)).reshape(L, -1) > 0).mean(1) for s in range(N)])
    np.testing.assert_allclose(tab["emph_fraction"], want)
    np.testing.assert_array_equal(tab["height"][3], store.atlas_corners[:, 2])
    assert (tab["lobe"] == 0).all() and np.isnan(tab["lung_fraction"]).all()

    # a store written by preprocessing: per-patch values come from the record
    root = tmp_path / "rec_store"
    corners = np.array([[0, 0, 0], [26, 0, 0], [0, 26, 0]])
    write_store_meta(root, corners, np.zeros((3, 3)), np.array([[1], [0], [0]]), patch_size=4)
    write_subject(root, "s1", np.zeros((3, 4, 4, 4)), label_patches=np.ones((3, 4, 4, 4)),
                  record={"patch_emph_fraction": [0.1, float("nan"), 0.3], "patch_lobe": [1, 4, 0],
                          "patch_lung_fraction": [0.5, 0.0, 1.0]})
    write_subject(root, "s2", np.zeros((3, 4, 4, 4)), label_patches=np.ones((3, 4, 4, 4)),
                  record={"patch_lung_fraction": [0.5, 0.0, 1.0]})
    rec = patch_table(PatchStore(root))
    np.testing.assert_allclose(rec["emph_fraction"][0], [0.1, np.nan, 0.3])
    np.testing.assert_array_equal(rec["lobe"][0], [1, 4, 0])
    # fallback: labelled voxels over lung voxels, clipped to 1, NaN without lung
    np.testing.assert_allclose(rec["emph_fraction"][1], [1.0, np.nan, 1.0])


def test_patch_table_rejects_wrong_length(tmp_path):
    root = tmp_path / "bad"
    write_store_meta(root, np.array([[0, 0, 0], [26, 0, 0]]), np.zeros((2, 3)), np.array([[1], [0]]), patch_size=4)
    with pytest.raises(ValueError, match="s1.*patch_lobe"):  # refused when written
        write_subject(root, "s1", np.zeros((2, 4, 4, 4)), record={"patch_lobe": [1, 2, 3]})
    write_subject(root, "s1", np.zeros((2, 4, 4, 4)), record={"patch_lobe": [1, 2]})
    rec_path = root / "subjects" / "s1.json"  # and when read: a record edited by hand
    rec_path.write_text(json.dumps({**json.loads(rec_path.read_text()), "patch_lobe": [1, 2, 3]}))
    with pytest.raises(ValueError, match="s1.*patch_lobe"):
        patch_table(PatchStore(root))


# -- field of view, validity and reasons ---------------------------------------------------------
def test_fov_fields_round_trip_and_reasons_join_in_the_table(tmp_path):
    data = {**_full_record(), "qc_pass": False, "qc_reasons": ["partial_fov:0.82", "thick_slices:5.0mm"],
            "fov_lung_coverage": 0.82, "patch_fov_fraction": [1.0, 0.25, 0.5]}
    rec = SubjectRecord.from_dict(data)
    assert rec.patch_fov_fraction.dtype == np.float32 and rec.qc_reasons == ["partial_fov:0.82", "thick_slices:5.0mm"]
    assert json.dumps(rec.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    assert rec.valid_patches().tolist() == [True, False, True]  # half inside is valid
    assert rec.valid_patches(0.6).tolist() == [True, False, False]
    assert rec.flat()["qc_reasons"] == "partial_fov:0.82;thick_slices:5.0mm"
    clean = SubjectRecord.from_dict({**_full_record("s2"), "qc_reasons": []})
    assert clean.flat()["qc_reasons"] == "" and clean.to_dict()["qc_reasons"] == []
    root = _store(tmp_path / "st")
    write_subject(root, "s1", np.zeros((3, 4, 4, 4)), record=rec)
    write_subject(root, "s2", np.zeros((3, 4, 4, 4)), record=clean)
    finalize_store(root)
    store = PatchStore(root)
    assert store.table.loc["s1", "qc_reasons"] == "partial_fov:0.82;thick_slices:5.0mm"
    assert store.table.loc["s1", "fov_lung_coverage"] == 0.82
    assert store.valid_patches("s1").tolist() == [True, False, True]
    assert store.valid_mask().tolist() == [[True, False, True], [True, True, True]]
    table = patch_table(store)
    assert np.isnan(table["laa950"][0, 1]) and table["laa950"][0, 2] == 12.5  # the invalid patch is out
    np.testing.assert_array_equal(table["valid"], store.valid_mask())
    np.testing.assert_allclose(table["fov_fraction"][0], [1.0, 0.25, 0.5])


def test_store_threshold_comes_from_store_json(tmp_path):
    root = tmp_path / "st"
    write_store_meta(root, CORNERS, np.zeros((3, 3)), np.zeros((3, 1), int), patch_size=4, min_patch_fov=0.2)
    write_subject(root, "s1", np.zeros((3, 4, 4, 4)), record={**_full_record(), "patch_fov_fraction": [1.0, 0.25, 0.1]})
    finalize_store(root)
    store = PatchStore(root)
    assert store.min_patch_fov == 0.2 and store.valid_patches("s1").tolist() == [True, True, False]


def test_stores_written_before_the_field_of_view_read_as_fully_inside(tmp_path):
    root = _store(tmp_path / "old")
    write_subject(root, "s1", np.zeros((3, 4, 4, 4)), record=_full_record())  # no fov fields, no reasons
    finalize_store(root)
    store = PatchStore(root)
    rec = store.record("s1")
    assert rec.patch_fov_fraction is None and rec.qc_reasons is None and rec.fov_lung_coverage is None
    assert store.min_patch_fov == 0.5 and store.valid_patches("s1").all()
    assert "qc_reasons" not in store.table.columns and "qc_reasons" not in rec.to_dict()
    assert patch_table(store)["valid"].all() and (patch_table(store)["fov_fraction"] == 1).all()
