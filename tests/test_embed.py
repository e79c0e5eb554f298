"""Embeddings: shapes, batching invariance, determinism, save/load, pooling, baseline."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.testing import make_toy_store
from drasclr_lib.embed import EmbeddingSet, embed_cohort, embed_subject, pool_subjects
from drasclr_lib.embed_cli import cli_main
from drasclr_lib.models import DrasEncoder, calibrate_batchnorm, load_encoder, random_encoder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """5 subjects x 8 locations: small enough that every test embeds in well under a second."""
    return PatchStore(make_toy_store(tmp_path_factory.mktemp("embed_store"), n_subjects=5, grid=(2, 2, 2)))


@pytest.fixture(scope="module")
def encoder(store):
    return random_encoder(0, store=store, calibration_batches=8, batch_size=8)


@pytest.fixture(scope="module")
def emb(encoder, store):
    return embed_cohort(encoder, store, progress=False, device="cpu")


def test_embed_cohort_shapes_and_meta(emb, store):
    assert emb.h.shape == (store.num_subjects, store.num_locations, 128)
    assert emb.h.dtype == np.float32 and np.isfinite(emb.h).all()
    assert emb.sids == store.sids
    np.testing.assert_array_equal(emb.locs, store.locs)
    np.testing.assert_array_equal(emb.atlas_corners, store.atlas_corners)
    assert emb.meta["num_subjects"] == store.num_subjects and emb.meta["device"] == "cpu"


def test_kept_host_memory_embeds_the_same_numbers(emb, store, encoder):
    """``host_memory`` changes where the activations' memory comes from, not the embeddings."""
    from drasclr_lib.host_memory import glibc_malloc_tunable

    assert emb.meta["host_memory"] == ("keep" if glibc_malloc_tunable() else "system")  # auto
    system = embed_cohort(encoder, store, progress=False, device="cpu", host_memory="system")
    assert system.meta["host_memory"] == "system"
    np.testing.assert_array_equal(system.h, emb.h)
    patches, locs = store.patches(0), store.locs
    np.testing.assert_array_equal(embed_subject(encoder, patches, locs, device="cpu", host_memory="keep"),
                                  embed_subject(encoder, patches, locs, device="cpu", host_memory="system"))


def test_embed_cohort_batch_size_defaults_to_the_devices(store, encoder, emb, tmp_path, capsys):
    from drasclr_lib.embed import cohort_batch_size

    # small batches on a CPU (faster there), large ones on a GPU; a given size is kept
    assert emb.meta["batch_size"] == 32 == cohort_batch_size(torch.device("cpu"))
    assert cohort_batch_size(torch.device("cuda")) == 256
    assert embed_cohort(encoder, store, batch_size=3, progress=False, device="cpu").meta["batch_size"] == 3
    out = tmp_path / "e.npz"
    assert cli_main(["--store", str(store.root), "--checkpoint", "random", "--calibration-batches", "1",
                     "--out", str(out), "--no-progress", "--batch-size", "2"]) == 0
    assert EmbeddingSet.load(out).meta["batch_size"] == 2
    with pytest.raises(SystemExit):
        cli_main(["--store", str(store.root), "--checkpoint", "random", "--out", str(tmp_path / "f.npz"),
                  "--batch-size", "0"])
    assert "must be 'auto' or a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "f.npz").exists()


def test_embed_cohort_is_deterministic_and_batch_size_free(encoder, store, emb):
    again = embed_cohort(encoder, store, progress=False, device="cpu")
    np.testing.assert_array_equal(again.h, emb.h)  # bit-identical across runs on CPU
    small = embed_cohort(encoder, store, batch_size=5, progress=False, device="cpu")
    np.testing.assert_allclose(small.h, emb.h, rtol=1e-4, atol=1e-5)


def test_embed_cohort_equals_embed_subject_mixed_locations(encoder, store, emb):
    # the mixed-location path (grouped conv) and the location-batched path agree
    h3 = embed_subject(encoder, store.patches(3), store.locs, batch_size=7, device="cpu")
    np.testing.assert_allclose(h3, emb.h[3], rtol=1e-4, atol=1e-5)
    grouped = embed_subject(encoder, store.patches(3), store.locs, group_by_location=True, device="cpu")
    np.testing.assert_allclose(grouped, h3, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(embed_subject(encoder, store.patches(3), store.locs, batch_size=7, device="cpu"), h3)


def test_embedding_depends_on_patch_and_location(encoder, store, emb):
    assert np.abs(emb.h[0] - emb.h[-1]).max() > 1e-3  # subjects differ
    moved = embed_subject(encoder, store.patches(0), np.roll(store.locs, 1, axis=0), device="cpu")
    assert np.abs(moved - emb.h[0]).max() > 1e-3  # same patches, other locations


def test_embed_cohort_subset_and_restores_train_mode(store):
    enc = DrasEncoder().train()
    sub = embed_cohort(enc, store, subjects=["toy002", 4], progress=False, device="cpu")
    assert sub.sids == ["toy002", "toy004"] and sub.h.shape[0] == 2
    assert enc.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="batch_size"):
        embed_cohort(enc, store, batch_size=0, progress=False)


def test_embed_subject_rejects_bad_shapes(encoder):
    with pytest.raises(ValueError, match="locs"):
        embed_subject(encoder, np.zeros((4, 32, 32, 32), np.int16), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="patches_hu"):
        embed_subject(encoder, np.zeros((4, 32, 32), np.int16), np.zeros((4, 3)))


def test_save_load_roundtrip(emb, tmp_path):
    path = emb.save(tmp_path / "sub" / "emb.npz")
    back = EmbeddingSet.load(path)
    np.testing.assert_array_equal(back.h, emb.h)
    assert back.sids == emb.sids and back.meta == emb.meta
    np.testing.assert_array_equal(back.atlas_corners, emb.atlas_corners)
    assert [p.name for p in path.parent.iterdir()] == ["emb.npz"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EmbeddingSet.load(tmp_path / "missing.npz")


def test_embedding_set_validates():
    h = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="subject ids"):
        EmbeddingSet(h=h, sids=["a"], locs=np.zeros((3, 3)), atlas_corners=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unique"):
        EmbeddingSet(h=h, sids=["a", "a"], locs=np.zeros((3, 3)), atlas_corners=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        EmbeddingSet(h=h, sids=["a", "b"], locs=np.zeros((2, 3)), atlas_corners=np.zeros((3, 3)))
    with pytest.raises(KeyError, match="zz"):
        EmbeddingSet(h=h, sids=["a", "b"], locs=np.zeros((3, 3)), atlas_corners=np.zeros((3, 3))).index("zz")


def test_pool_subjects_maths():
    h = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    np.testing.assert_allclose(pool_subjects(h, "mean"), h.mean(1))
    mm = pool_subjects(h, "meanmax")
    assert mm.shape == (2, 4)
    np.testing.assert_allclose(mm[:, 2:], h.max(1))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_subjects(h, "median")
    with pytest.raises(ValueError, match=r"\(N, L, D\)"):
        pool_subjects(h[0])


def test_random_encoder_seeded_and_leaves_global_rng(store):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = random_encoder(7), random_encoder(7), random_encoder(8)
    np.testing.assert_array_equal(torch.rand(3), expected)  # global RNG untouched
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not a.training


def test_batchnorm_calibration_makes_random_features_informative(store):
    # fresh BatchNorm statistics squash the random network's signal; calibrated ones do not
    raw = embed_cohort(random_encoder(0), store, subjects=[0, 4], progress=False, device="cpu").h
    enc = random_encoder(0)
    w = enc.conv1.weight.detach().clone()
    calibrate_batchnorm(enc, store, num_batches=4, batch_size=5)
    assert torch.equal(enc.conv1.weight, w) and not enc.training and enc.bn1.momentum == 0.1
    cal = embed_cohort(enc, store, subjects=[0, 4], progress=False, device="cpu").h
    assert cal.std(axis=0).mean() > 100 * raw.std(axis=0).mean()
    assert cal.std(axis=0).mean() > 0.05


def test_cli_embed_checkpoint(store, encoder, emb, tmp_path, capsys):
    ckpt = tmp_path / "enc.pt"
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in encoder.state_dict().items()}}, ckpt)
    out2 = tmp_path / "emb_ckpt.npz"
    assert cli_main(["--store", str(store.root), "--checkpoint", str(ckpt), "--out", str(out2), "--no-progress",
                     "--batch-size", "4"]) == 0
    loaded = EmbeddingSet.load(out2)
    assert loaded.meta["checkpoint"] == str(ckpt.resolve())
    np.testing.assert_allclose(loaded.h, emb.h, rtol=1e-4, atol=1e-5)  # same weights, same embeddings
    assert cli_main(["--store", str(store.root), "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out2)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_embed_random_calibrates_batchnorm(store, tmp_path):
    # `--checkpoint random` must give the calibrated baseline of notebook 03, not the initial
    # BatchNorm statistics that make every patch embed to (nearly) the same vector
    out = tmp_path / "emb_random.npz"
    assert cli_main(["--store", str(store.root), "--checkpoint", "random", "--seed", "3", "--out", str(out),
                     "--calibration-batches", "4", "--device", "cpu", "--no-progress"]) == 0
    loaded = EmbeddingSet.load(out)
    assert loaded.h.shape == (store.num_subjects, store.num_locations, 128)
    assert loaded.meta["checkpoint"] == "random" and loaded.meta["seed"] == 3
    assert loaded.meta["batchnorm_calibrated"] is True and loaded.meta["calibration_batches"] == 4
    # embeddings vary across subjects at every location
    spread = loaded.h.std(axis=0).mean(axis=-1)  # (L,)
    assert (spread > 1e-3).all(), spread
    # the same seed through the library gives the same embeddings
    want = embed_cohort(random_encoder(3, store=store, calibration_batches=4, device="cpu"), store,
                        progress=False, device="cpu")
    np.testing.assert_allclose(loaded.h, want.h, rtol=1e-4, atol=1e-5)


def test_drasclr_embed_command_is_this_cli():
    # `drasclr embed` resolves through the COMMANDS table of drasclr_lib.cli to the tested cli_main
    import importlib

    from drasclr_lib.cli import COMMANDS

    module, func, _ = COMMANDS["embed"]
    assert getattr(importlib.import_module(module), func) is cli_main


# -- released weights on the published atlas only ----------------------------------------------
def _published_format_checkpoint(path, encoder):
    """A checkpoint in the released DrasCLR layout (``module.encoder_q.*``, ``module.encoder_k.*``,
    ``module.queue``, ``module.queue_ptr``) holding ``encoder``'s weights."""
    sd = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v.clone() for k, v in encoder.state_dict().items()})
    sd["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 4, 3), dim=0)
    sd["module.queue_ptr"] = torch.zeros(3, dtype=torch.long)
    torch.save({"epoch": 20, "arch": "custom", "state_dict": sd, "optimizer": {}}, path)
    return path


class _TinyEncoder(torch.nn.Module):
    """Stands in for released weights where only the atlas check is under test: mean and spread
    of each patch as ``h`` (any patch size), so a 581-location store embeds in milliseconds."""

    checkpoint_format = "published"

    def forward(self, x, loc):
        h = torch.stack([x.mean(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4))], dim=1)
        return h, h


def _published_atlas_store(root, n_subjects=2, patch_size=4, corners=None):
    """A store on the published atlas's 581 corners with tiny patches (what the check reads)."""
    from drasclr_lib.data.patch_store import write_store_meta, write_subject
    from drasclr_lib.preprocess.atlas_source import PUBLISHED_SOURCE, published_landmarks
    from drasclr_lib.preprocess.landmarks import nearest_neighbors, normalize_locations

    corners = published_landmarks() if corners is None else corners
    write_store_meta(root, corners, normalize_locations(corners), nearest_neighbors(corners, 2),
                     patch_size=patch_size, atlas_source=PUBLISHED_SOURCE)
    rng = np.random.default_rng(0)
    for s in range(n_subjects):
        vol = rng.normal(-800, 50, size=(len(corners), patch_size, patch_size, patch_size)).astype(np.int16)
        write_subject(root, f"pub{s}", vol, record={"lung_volume_l": 5.0})
    return PatchStore(root)


def test_load_encoder_records_the_checkpoint_format(encoder, tmp_path):
    pub = load_encoder(_published_format_checkpoint(tmp_path / "released.pt", encoder))
    assert pub.checkpoint_format == "published"
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in encoder.state_dict().items()}}, tmp_path / "own.pt")
    assert load_encoder(tmp_path / "own.pt").checkpoint_format == "own"
    torch.save(encoder.state_dict(), tmp_path / "bare.pt")
    assert load_encoder(tmp_path / "bare.pt").checkpoint_format == "bare"
    assert DrasEncoder().checkpoint_format is None and encoder.checkpoint_format is None


def test_released_weights_on_another_atlas_warn(store, encoder, emb, tmp_path):
    pub = load_encoder(_published_format_checkpoint(tmp_path / "released.pt", encoder))
    with pytest.warns(UserWarning, match="published-format DrasCLR checkpoint") as record:
        got = embed_cohort(pub, store, progress=False, device="cpu")
    message = str(record[0].message)
    # names the store, its atlas source and its number of locations, and says what to do
    assert str(store.root) in message and "'toy'" in message and f"with {store.num_locations} locations" in message
    assert "581" in message and "atlas='published'" in message and "--atlas published" in message
    assert record[0].filename == __file__  # points at the caller of embed_cohort
    np.testing.assert_allclose(got.h, emb.h, rtol=1e-4, atol=1e-5)  # a warning, the embedding still runs


def test_own_weights_on_any_atlas_do_not_warn(store, encoder, tmp_path):
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in encoder.state_dict().items()}}, tmp_path / "own.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embed_cohort(load_encoder(tmp_path / "own.pt"), store, subjects=[0], progress=False, device="cpu")
        embed_cohort(encoder, store, subjects=[0], progress=False, device="cpu")


def test_released_weights_on_the_published_atlas_do_not_warn(tmp_path):
    from drasclr_lib.preprocess.atlas_source import published_landmarks

    pub_store = _published_atlas_store(tmp_path / "published_store")
    assert pub_store.num_locations == 581
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = embed_cohort(_TinyEncoder(), pub_store, progress=False, device="cpu")
    assert got.h.shape == (2, 581, 2) and np.isfinite(got.h).all()
    # the same 581 corners in another order are another atlas for the released weights
    shuffled = published_landmarks()[np.random.default_rng(1).permutation(581)]
    other = _published_atlas_store(tmp_path / "shuffled_store", n_subjects=1, corners=shuffled)
    with pytest.warns(UserWarning, match="with 581 locations"):
        embed_cohort(_TinyEncoder(), other, progress=False, device="cpu")


# -- exports from the command (drasclr_lib.exports; the tables themselves: tests/test_exports.py) -----------------
def test_cli_embed_writes_csv_and_parquet_tables(store, encoder, emb, tmp_path, capsys):
    import pandas as pd

    ckpt = tmp_path / "enc.pt"
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in encoder.state_dict().items()}}, ckpt)
    base = ["--store", str(store.root), "--checkpoint", str(ckpt), "--no-progress", "--device", "cpu"]
    assert cli_main([*base, "--out", str(tmp_path / "subjects.csv")]) == 0  # subject level, from the suffix
    assert "one row per subject" in capsys.readouterr().out
    subjects = pd.read_csv(tmp_path / "subjects.csv", dtype={"sid": str})
    assert subjects["sid"].tolist() == store.sids
    np.testing.assert_allclose(subjects["FEV1pp"], store.table["FEV1pp"])  # the manifest's labels ride along
    h_cols = [f"h_{i}" for i in range(128)]
    np.testing.assert_allclose(subjects[h_cols].to_numpy(), pool_subjects(emb.h), rtol=1e-4, atol=1e-5)
    assert cli_main([*base, "--format", "parquet", "--level", "patch", "--out", str(tmp_path / "patches.pq")]) == 0
    patches = pd.read_parquet(tmp_path / "patches.pq")
    assert len(patches) == store.num_subjects * store.num_locations
    assert patches["sid"].tolist() == list(np.repeat(store.sids, store.num_locations))
    np.testing.assert_array_equal(patches[["corner_i", "corner_j", "corner_k"]].to_numpy(),
                                  np.tile(store.atlas_corners, (store.num_subjects, 1)))
    np.testing.assert_allclose(patches[h_cols].to_numpy(), emb.h.reshape(-1, 128), rtol=1e-4, atol=1e-5)
    # a contradictory request fails before anything is embedded
    assert cli_main([*base, "--format", "npz", "--level", "subject", "--out", str(tmp_path / "x.npz")]) == 2
    assert "every patch" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


# -- invalid patches (mostly outside the scanned volume) ----------------------------------------
def test_invalid_patches_embed_as_nan_and_pooling_skips_them(encoder, emb, tmp_path):
    from drasclr_lib.exports import subject_table
    from drasclr_lib.utils import load_json, save_json

    root = make_toy_store(tmp_path / "partial", n_subjects=5, grid=(2, 2, 2))
    store = PatchStore(root)
    frac = {store.sids[1]: [1, 0.1, 1, 1, 0.49, 1, 1, 0.5], store.sids[3]: [0.0] * 8}  # subject 3: nothing scanned
    for sid, f in frac.items():
        path = root / "subjects" / f"{sid}.json"
        save_json({**load_json(path), "patch_fov_fraction": f}, path)
    store = PatchStore(root)
    valid = store.valid_mask()
    out = embed_cohort(encoder, store, progress=False, device="cpu")
    assert out.meta["invalid_patches"] == int((~valid).sum()) == 10
    assert np.isnan(out.h[~valid]).all() and np.isfinite(out.h[valid]).all()
    np.testing.assert_array_equal(out.h[valid], emb.h[valid])  # valid patches embed as before
    # pooling: the mean / max over the valid patches only; a subject without any is a NaN row
    pooled = pool_subjects(out.h, "meanmax")
    D = out.dim
    np.testing.assert_allclose(pooled[1, :D], emb.h[1][valid[1]].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[1, D:], emb.h[1][valid[1]].max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[0], pool_subjects(emb.h, "meanmax")[0], rtol=1e-6)
    assert np.isnan(pooled[3]).all() and np.isfinite(np.delete(pooled, 3, axis=0)).all()
    table = subject_table(out, store)  # the export pools the same way
    np.testing.assert_allclose(table.loc[1, [f"h_{i}" for i in range(D)]].to_numpy(float), pooled[1, :D], rtol=1e-6)
    # embed_subject: the same rule for one scan
    h1 = embed_subject(encoder, store.patches(1), store.locs, device="cpu", valid=valid[1])
    assert np.isnan(h1[~valid[1]]).all()
    np.testing.assert_allclose(h1[valid[1]], emb.h[1][valid[1]], rtol=1e-4, atol=1e-5)
    grouped = embed_subject(encoder, store.patches(1), store.locs, device="cpu", valid=valid[1], group_by_location=True)
    np.testing.assert_allclose(grouped, h1, rtol=1e-4, atol=1e-5)
    none = embed_subject(encoder, store.patches(3), store.locs, device="cpu", valid=valid[3])
    assert none.shape == (8, D) and np.isnan(none).all()
