"""Exports: subject and patch tables read back with pandas equal the EmbeddingSet, rows keep their
own subject's labels whatever the order, CSV equals Parquet, and the CLI writes every format."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from drasclr_lib.data.patch_store import PatchStore, finalize_store, patch_table, write_store_meta, write_subject
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.embed_cli import build_parser, cli_main
from drasclr_lib.exports import (QC_COLUMNS, export_embeddings, export_format, label_columns, patch_table_long,
                                 subject_table)

N, L, P, D = 5, 6, 4, 8
LABELS = ["FEV1pp", "GOLD", "time", "event", "sex", "group", "my_score"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store whose every per-subject and per-patch fact differs between subjects: lobe and
    LAA-950 per patch, labels per subject, and per-stage timings that must not be exported."""
    root = tmp_path_factory.mktemp("export_store")
    corners = np.array([[10 + 7 * l, 20 + 3 * l, 30 + 5 * (l % 2)] for l in range(L)])
    write_store_meta(root, corners, np.linspace(-1, 1, L * 3).reshape(L, 3), np.zeros((L, 1), int), patch_size=P)
    rows = []
    for s in range(N):
        sid = f"p{s:02d}"
        write_subject(root, sid, np.full((L, P, P, P), -800 - s, np.int16), record={
            "lung_volume_l": 4.0 + s, "laa950": 2.0 * s, "reg_dice": 0.9, "qc_pass": True,
            "patch_lobe": [(s + l) % 5 + 1 for l in range(L)], "patch_laa950": [10.0 * s + l for l in range(L)],
            "patch_lung_fraction": [0.5 + 0.01 * s for _ in range(L)], "patch_emph_fraction": [0.1 * s] * L,
            "time_read_s": 0.5, "time_register_s": 3.0 + s})
        rows.append({"sid": sid, "image": f"/data/{sid}.nii.gz", "FEV1pp": 90.0 - 10 * s, "GOLD": s % 5,
                     "time": 1.5 + s, "event": s % 2, "sex": "MF"[s % 2], "group": f"pat{s // 2}",
                     "my_score": 0.25 * s * s})
    finalize_store(root, pd.DataFrame(rows))
    return PatchStore(root)


@pytest.fixture(scope="module")
def emb(store):
    """Embeddings of four of the store's subjects, in an order unlike the store's: a row put next
    to the store's i-th subject's labels (position instead of sid) gets another subject's."""
    rng = np.random.default_rng(0)
    sids = ["p03", "p00", "p04", "p01"]
    return EmbeddingSet(h=rng.normal(size=(len(sids), L, D)).astype(np.float32), sids=sids, locs=store.locs,
                        atlas_corners=store.atlas_corners, meta={"checkpoint": "test"})


def test_label_columns_are_the_manifests(store):
    assert label_columns(store.table) == LABELS  # no paths, timings, QC or bookkeeping
    with_qc = label_columns(store.table, qc=True)
    assert set(with_qc) - set(LABELS) == {"lung_volume_l", "laa950", "reg_dice", "qc_pass"} <= set(QC_COLUMNS)
    assert "time" in with_qc and not any(c.startswith("time_") for c in with_qc)  # survival time is a label


def test_subject_table_rows_follow_sids_not_positions(store, emb):
    df = subject_table(emb, store)
    assert list(df.columns) == ["sid", *LABELS, *[f"h_{i}" for i in range(D)]]
    assert df["sid"].tolist() == emb.sids
    for i, sid in enumerate(emb.sids):
        s = int(sid[1:])
        row = df.iloc[i]
        assert row["FEV1pp"] == 90.0 - 10 * s and row["my_score"] == 0.25 * s * s and row["group"] == f"pat{s // 2}"
        np.testing.assert_array_equal(row[[f"h_{j}" for j in range(D)]].to_numpy(np.float32), emb.h[i].mean(0))
    assert (df[[f"h_{j}" for j in range(D)]].dtypes == np.float32).all()


def test_subject_table_pooling_columns_and_qc(store, emb):
    df = subject_table(emb, store, pool="meanmax", columns=["GOLD"], qc=True)  # explicit columns win
    assert list(df.columns[:2]) == ["sid", "GOLD"] and df.shape[1] == 2 + 2 * D
    np.testing.assert_array_equal(df[[f"h_max_{j}" for j in range(D)]].to_numpy(), emb.h.max(axis=1))
    np.testing.assert_array_equal(df[[f"h_mean_{j}" for j in range(D)]].to_numpy(), emb.h.mean(axis=1))
    assert subject_table(emb, store, qc=True)["laa950"].tolist() == [2.0 * int(s[1:]) for s in emb.sids]
    bare = subject_table(emb)  # no store: sid and embedding only
    assert list(bare.columns) == ["sid", *[f"h_{i}" for i in range(D)]]
    with pytest.raises(KeyError, match="did you mean 'FEV1pp'"):
        subject_table(emb, store, columns=["fev1pp"])
    with pytest.raises(ValueError, match="pooling"):
        subject_table(emb, store, pool="median")


def test_patch_table_long_one_row_per_subject_and_location(store, emb):
    df = patch_table_long(emb, store)
    assert len(df) == emb.num_subjects * L
    assert list(df.columns[:9]) == ["sid", "location", "corner_i", "corner_j", "corner_k", "lobe", "lung_fraction",
                                    "laa950", "emph_fraction"]
    facts = patch_table(store)
    for r in range(len(df)):
        i, loc = divmod(r, L)
        sid, pos = emb.sids[i], store.index(emb.sids[i])
        row = df.iloc[r]
        assert row["sid"] == sid and row["location"] == loc
        assert [row["corner_i"], row["corner_j"], row["corner_k"]] == store.atlas_corners[loc].tolist()
        assert row["lobe"] == facts["lobe"][pos, loc] == (int(sid[1:]) + loc) % 5 + 1
        assert row["laa950"] == 10.0 * int(sid[1:]) + loc
        np.testing.assert_array_equal(row[[f"h_{j}" for j in range(D)]].to_numpy(np.float32), emb.h[i, loc])
    sub = patch_table_long(emb, store, subjects=[2])
    pd.testing.assert_frame_equal(sub, df.iloc[2 * L:3 * L].reset_index(drop=True))
    assert (patch_table_long(emb)["lobe"] == 0).all()  # no store: lobe unknown


@pytest.mark.parametrize("level", ["subject", "patch"])
def test_csv_and_parquet_read_back_identical(store, emb, tmp_path, level):
    want = subject_table(emb, store) if level == "subject" else patch_table_long(emb, store)
    csv = export_embeddings(emb, store, tmp_path / "e.csv", level=level, chunk_subjects=3)
    pq = export_embeddings(emb, store, tmp_path / "e.parquet", level=level, chunk_subjects=3)
    from_pq = pd.read_parquet(pq)
    from_csv = pd.read_csv(csv, dtype={"sid": str})
    pd.testing.assert_frame_equal(from_pq, want)  # Parquet keeps dtypes (float32 h) exactly
    h = [c for c in want.columns if c.startswith("h_")]
    from_csv[h] = from_csv[h].astype(np.float32)  # CSV text round-trips float32 exactly
    pd.testing.assert_frame_equal(from_csv, from_pq, check_dtype=False)
    import pyarrow.parquet as pq_

    facts = json.loads(pq_.read_schema(pq).metadata[b"drasclr"])
    assert facts["level"] == level and facts["dim"] == D and facts["embedding_meta"]["checkpoint"] == "test"
    assert not list(tmp_path.glob(".*part*"))  # no temporaries left


def test_npz_export_is_the_embedding_set(store, emb, tmp_path):
    back = EmbeddingSet.load(export_embeddings(emb, store, tmp_path / "e.npz"))
    np.testing.assert_array_equal(back.h, emb.h)
    assert back.sids == emb.sids and back.meta == emb.meta
    with pytest.raises(ValueError, match="every patch"):
        export_embeddings(emb, store, tmp_path / "x.npz", level="subject")


def test_export_errors_name_the_problem(store, emb, tmp_path):
    with pytest.raises(ValueError, match="suffix of a npz"):
        export_embeddings(emb, store, tmp_path / "x.npz", format="csv")
    with pytest.raises(ValueError, match="cannot tell the format"):
        export_embeddings(emb, store, tmp_path / "x.txt")
    assert export_format(tmp_path / "x.txt", default="npz") == "npz" and export_format("a.CSV.gz") == "csv"
    other = EmbeddingSet(h=emb.h[:, :3], sids=emb.sids, locs=emb.locs[:3], atlas_corners=emb.atlas_corners[:3])
    with pytest.raises(ValueError, match="atlas locations differ"):
        subject_table(other, store)
    stranger = EmbeddingSet(h=emb.h, sids=["p00", "zz9", "p01", "p02"], locs=emb.locs, atlas_corners=emb.atlas_corners)
    with pytest.raises(KeyError, match="zz9"):
        patch_table_long(stranger, store)


def test_failed_patch_export_leaves_nothing(store, emb, tmp_path, monkeypatch):
    import drasclr_lib.exports as exports

    real, calls = exports.patch_table_long, []

    def fails_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(exports, "patch_table_long", fails_on_second_chunk)
    out = tmp_path / "p.parquet"
    with pytest.raises(RuntimeError):
        export_embeddings(emb, store, out, level="patch", chunk_subjects=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_saved_embeddings_in_every_format(store, emb, tmp_path, capsys):
    src = emb.save(tmp_path / "emb.npz")
    base = ["--store", str(store.root), "--embeddings", str(src)]
    assert cli_main([*base, "--out", str(tmp_path / "s.csv")]) == 0  # suffix -> csv, subject level
    got = pd.read_csv(tmp_path / "s.csv", dtype={"sid": str})
    assert got["sid"].tolist() == emb.sids and got["FEV1pp"].tolist() == [90.0 - 10 * int(s[1:]) for s in emb.sids]
    assert cli_main([*base, "--out", str(tmp_path / "p.parquet"), "--level", "patch"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"), patch_table_long(emb, store))
    assert cli_main([*base, "--out", str(tmp_path / "s.bin"), "--format", "parquet", "--pool", "meanmax",
                     "--qc"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s.bin"),
                                  subject_table(emb, store, pool="meanmax", qc=True))
    assert cli_main([*base, "--out", str(tmp_path / "copy.npz")]) == 0
    np.testing.assert_array_equal(EmbeddingSet.load(tmp_path / "copy.npz").h, emb.h)
    capsys.readouterr()
    # mistakes stop before anything is written, with the reason
    assert cli_main([*base, "--out", str(tmp_path / "s.npz"), "--level", "subject"]) == 2
    assert "every patch" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "s.npz"), "--format", "csv"]) == 2
    assert "suffix of a npz" in capsys.readouterr().err
    assert cli_main(["--store", str(tmp_path / "nostore"), "--embeddings", str(src),
                     "--out", str(tmp_path / "x.csv")]) == 2
    assert "not a patch store" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "x.csv").exists()


def test_cli_help_shows_every_default_and_an_example():
    text = build_parser().format_help()
    for opt, default in (("--format", "auto"), ("--pool", "mean"), ("--batch-size", "auto"), ("--device", "auto"),
                         ("--seed", "0"), ("--calibration-batches", "64"), ("--calibration-batch-size", "32")):
        blocks = [b for b in text.split("options:", 1)[1].split("\n  --") if b.startswith(opt[2:] + " ")]
        assert len(blocks) == 1 and f"(default: {default})" in " ".join(blocks[0].split()), opt
    assert "(default: None)" not in text and "examples:" in text and "--format parquet --level patch" in text
    parser = build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_field_of_view_columns_are_qc_and_invalid_patches_nan(tmp_path):
    """qc_reasons and fov_lung_coverage are QC columns, not labels; the patch table carries each
    patch's fov_fraction, and invalid patches' %LAA-950 and embedding are NaN."""
    write_store_meta(tmp_path, np.zeros((L, 3), int), np.zeros((L, 3)), np.zeros((L, 1), int), patch_size=P)
    fov = [1.0, 0.2, 1.0, 0.7, 1.0, 0.0]
    for s, (reasons, frac) in enumerate([(["partial_fov:0.70"], fov), ([], [1.0] * L)]):
        write_subject(tmp_path, f"q{s}", np.full((L, P, P, P), -800, np.int16), record={
            "reg_dice": 0.9, "qc_pass": not reasons, "qc_reasons": reasons, "fov_lung_coverage": 0.7 if reasons else 1.0,
            "patch_fov_fraction": frac, "patch_laa950": [5.0] * L})
    finalize_store(tmp_path, pd.DataFrame({"sid": ["q0", "q1"], "FEV1pp": [50.0, 80.0]}))
    store = PatchStore(tmp_path)
    assert label_columns(store.table) == ["FEV1pp"]
    assert {"qc_reasons", "fov_lung_coverage", "qc_pass"} <= set(label_columns(store.table, qc=True))
    h = np.ones((2, L, D), np.float32)
    h[~store.valid_mask()] = np.nan
    emb = EmbeddingSet(h=h, sids=["q0", "q1"], locs=store.locs, atlas_corners=store.atlas_corners)
    df = patch_table_long(emb, store)
    np.testing.assert_allclose(df["fov_fraction"].to_numpy()[:L], fov)
    assert df["laa950"].isna().tolist()[:L] == [False, True, False, False, False, True]
    sub = subject_table(emb, store, qc=True)
    assert sub.loc[0, "qc_reasons"] == "partial_fov:0.70" and (sub[[f"h_{i}" for i in range(D)]] == 1).all().all()
