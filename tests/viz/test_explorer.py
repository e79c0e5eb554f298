"""Patch explorer: volumes line up with the stored patches, similarity maths, static and widget views."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import SimpleITK as sitk

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.testing import make_toy_store
from drasclr_lib.viz.explorer import PatchExplorer, cosine_to, show_explorer, similar_subjects
from drasclr_lib.viz.volumes import SubjectVolume, load_subject_volume, similarity_slice

P = 32


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory):
    """A store whose subjects have a real CT file, a recorded 1 mm grid and patch corners.

    The toy store's 1 mm grid starts 3 mm past the scan's origin on every axis (as a padded or
    cropped grid would) and each subject's corners are shifted, so the explorer must resample onto
    the recorded grid and use the subject's corners to line the boxes up with the patches.
    """
    root = tmp_path_factory.mktemp("ct_store")
    return PatchStore(make_toy_store(root / "store", n_subjects=3, grid=(2, 1, 2), patch_size=P, scans=root / "scans"))


def _emb(store, seed=0, D=8):
    h = np.random.default_rng(seed).normal(size=(store.num_subjects, store.num_locations, D))
    return EmbeddingSet(h=h, sids=store.sids, locs=store.locs, atlas_corners=store.atlas_corners)


def test_ct_volume_lines_up_with_stored_patches(ct_store):
    sid = ct_store.sids[1]
    vol = load_subject_volume(ct_store, sid, source="ct")
    scan = sitk.ReadImage(ct_store.table.loc[sid, "image"])
    grid_shape = tuple(ct_store.subject_grid(sid).GetSize())[::-1]
    assert vol.source == "CT" and vol.hu.shape == grid_shape and grid_shape != tuple(scan.GetSize())[::-1]
    for n, (i, j, k) in enumerate(vol.corners):
        np.testing.assert_array_equal(vol.hu[k:k + P, j:j + P, i:i + P], ct_store.get(sid, n))


def test_mosaic_volume_and_fallback(ct_store, toy_store):
    mosaic = load_subject_volume(ct_store, 0, source="patches")
    assert mosaic.source == "patch mosaic"
    i, j, k = mosaic.corners[3]  # the last patch pasted is intact
    np.testing.assert_array_equal(mosaic.hu[k:k + P, j:j + P, i:i + P], ct_store.get(0, 3))
    toy = PatchStore(toy_store)  # no image column: "auto" falls back to the mosaic, "ct" raises
    with pytest.warns(UserWarning, match="mosaic"):
        assert load_subject_volume(toy, 0).source == "patch mosaic"
    with pytest.raises(FileNotFoundError, match="toy000"):
        load_subject_volume(toy, 0, source="ct")
    with pytest.raises(ValueError, match="source"):
        load_subject_volume(toy, 0, source="mri")


def test_similarity_helpers():
    v = np.array([[1.0, 0], [0, 2], [-3, 0], [0, 0]])
    np.testing.assert_allclose(cosine_to(v, np.array([2.0, 0])), [1, 0, -1, 0])
    h = np.zeros((4, 1, 2))
    h[:, 0] = [[1, 0], [1, 0.1], [0, 1], [-1, 0]]
    most, least = similar_subjects(h, 0, 0, n=2)
    assert [i for i, _ in most] == [1, 2] and [i for i, _ in least] == [3, 2]
    assert most[0][1] == pytest.approx(1 / np.sqrt(1.01))
    vol = SubjectVolume("x", np.zeros((10, 6, 6), np.int16), np.array([[0, 0, 0], [2, 2, 0], [0, 0, 8]]), 4, "CT")
    sl = similarity_slice(vol, np.array([1.0, 3.0, 9.0]), k=1)  # the third box does not cross slice 1
    assert sl[0, 0] == 1.0 and sl[3, 3] == 2.0 and sl[5, 5] == 3.0 and np.isnan(sl[0, 5])
    deep = SubjectVolume("y", np.zeros((10, 6, 6), np.int16), np.array([[0, 0, 3], [2, 2, 6]]), 4, "CT")
    sl = similarity_slice(deep, np.array([5.0, 7.0]), k=6)  # both boxes cross slice 6, from different depths
    assert sl[0, 0] == 5.0 and sl[3, 3] == 6.0 and sl[5, 5] == 7.0 and np.isnan(sl[0, 5])


def test_similarity_leaves_out_patches_embedded_as_nan():
    """Patches outside the field of view embed as NaN: no similarity, never among the most/least similar."""
    v = np.array([[1.0, 0], [np.nan, np.nan], [0, 0]])
    sims = cosine_to(v, np.array([1.0, 0]))
    assert sims[0] == 1 and np.isnan(sims[1]) and sims[2] == 0
    assert np.isnan(cosine_to(v, np.array([np.nan, 0]))).all()
    h = np.zeros((4, 1, 2))
    h[:, 0] = [[1, 0], [np.nan, np.nan], [0, 1], [-1, 0]]
    most, least = similar_subjects(h, 0, 0, n=3)
    assert [i for i, _ in most] == [2, 3] and [i for i, _ in least] == [3, 2]
    assert similar_subjects(h, 1, 0, n=2) == ([], [])


def test_static_figure_and_show(ct_store, tmp_path):
    ex = PatchExplorer(_emb(ct_store), ct_store, subject=ct_store.sids[2], n_similar=1)
    fig = ex.figure(loc=1)
    titles = [a.get_title() for a in fig.axes]
    assert any(f"{ct_store.sids[2]} (CT)" in t for t in titles) and sum("similar" in t for t in titles) >= 2
    plt.close(fig)
    saved = show_explorer(ex, interactive=False, save_to=tmp_path)
    assert saved and all(p.exists() and p.stat().st_size > 1000 for p in saved)
    with pytest.raises(ValueError, match="location"):
        ex.figure(loc=99)


def test_widget_builds_and_reacts(ct_store):
    pytest.importorskip("ipywidgets")
    ex = PatchExplorer(_emb(ct_store), ct_store, source="patches")
    panel = ex.widget()
    c = panel.controls
    c["patch"].value = 2  # picking a patch jumps to its centre slice
    assert c["slice"].value == ex.volume(0).center_slice(2)
    picks = [v for _, v in c["on_slice"].options if v >= 0]
    assert 2 in picks and set(picks) == set(ex.volume(0).patches_on_slice(c["slice"].value).tolist())
    c["subject"].value = 1
    assert ex.subject == 1 and c["slice"].max == ex.volume(1).hu.shape[0] - 1
    other = next(v for v in picks if v != 2)
    c["on_slice"].value = other
    assert c["patch"].value == other


def test_widget_error_shows_in_panel_and_panel_keeps_working(ct_store):
    """A failing callback must not freeze the panel, and its error must land in the panel.

    In JupyterLab an exception raised in a widget callback outside the Output widget only reaches
    the log console (seen in a live session with tools/check_explorer_jupyterlab.py --inject-error),
    and the old code left its "busy" flag set, so every later slice change was silently ignored.
    """
    pytest.importorskip("ipywidgets")
    ex = PatchExplorer(_emb(ct_store), ct_store, source="patches")
    panel = ex.widget()
    c = panel.controls
    real = ex.volume

    def unreadable(s):
        if s == 1:
            raise FileNotFoundError("subject ct1: CT file gone")
        return real(s)

    ex.volume = unreadable  # the callbacks look the method up on the instance
    c["subject"].value = 1  # fails: no exception escapes into the front end's log ...
    c["patch"].value = 2  # ... this one fails half-way through, after silencing the other callbacks
    errors = "".join(o.get("text", "") for o in c["output"].outputs if o.get("name") == "stderr")
    assert "FileNotFoundError" in errors and "ct1" in errors  # ... it is shown in the panel instead
    ex.volume = real  # the scan is readable again: the panel must react to the next change
    k = (c["slice"].value + 20) % (c["slice"].max + 1)
    c["slice"].value = k
    picks = [v for _, v in c["on_slice"].options if v >= 0]
    assert picks == ex.volume(1).patches_on_slice(k).tolist()


def test_explorer_validates(ct_store):
    emb = _emb(ct_store)
    bad = EmbeddingSet(h=emb.h[:, :2], sids=emb.sids, locs=emb.locs[:2], atlas_corners=emb.atlas_corners[:2])
    with pytest.raises(ValueError, match="locations"):
        PatchExplorer(bad, ct_store)
    with pytest.raises(ValueError, match="n_similar"):
        PatchExplorer(emb, ct_store, n_similar=0)
