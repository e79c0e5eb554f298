"""read_manifest / resolve_manifest: validation errors name row and column; YAML sources map columns."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from drasclr_lib.data.manifest import STANDARD_COLUMNS, ManifestError, ManifestWarning, detect_separator
from drasclr_lib.data.sources import expand_env, load_source, manifest_dir, read_manifest, resolve_manifest


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def cohort(tmp_path):
    """Three subjects with image files under images/, a mask for one, and a manifest CSV."""
    for sid in ("s1", "s2", "s3"):
        _write(tmp_path / "images" / f"{sid}.nii.gz", "x")
    _write(tmp_path / "masks" / "s1.nii.gz", "x")
    (tmp_path / "dicom_s3").mkdir()
    header = "sid,image,lung_mask,FEV1pp,FEV1_FVC,GOLD,sex,split,event,time,emph_fraction,emph_paraseptal,site\n"
    rows = [
        "s1,images/s1.nii.gz,masks/s1.nii.gz,85.5,0.72,0,F,train,0,4.5,0.01,0.0,A\n",
        "s2,images/s2.nii.gz,,40,0.45,3,male,val,1,2.0,0.25,0.05,B\n",
        "s3,dicom_s3,,,,,1,test,,,,,C\n",
    ]
    return tmp_path, header, rows


def _manifest(cohort, rows=None, header=None) -> Path:
    root, h, r = cohort
    return _write(root / "manifest.csv", (header or h) + "".join(rows if rows is not None else r))


def _error(path, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    return str(info.value)


def test_good_manifest_parses_and_round_trips(cohort):
    root = cohort[0]
    df = read_manifest(_manifest(cohort))
    assert list(df.columns[: len(STANDARD_COLUMNS)]) == list(STANDARD_COLUMNS)
    assert list(df.columns[len(STANDARD_COLUMNS):]) == ["site"]  # extra columns kept, after ours
    assert df["sid"].tolist() == ["s1", "s2", "s3"]
    # relative paths resolved against the manifest's folder, absolute in the output
    assert df.loc[0, "image"] == str((root / "images" / "s1.nii.gz").resolve())
    assert df.loc[2, "image"] == str((root / "dicom_s3").resolve())  # a DICOM folder is a valid image
    assert df.loc[0, "lung_mask"] == str((root / "masks" / "s1.nii.gz").resolve())
    assert pd.isna(df.loc[1, "lung_mask"]) and pd.isna(df.loc[0, "label_map"])
    assert df["FEV1pp"].dtype == float and df.loc[0, "FEV1pp"] == 85.5 and math.isnan(df.loc[2, "FEV1pp"])
    assert df["sex"].tolist() == ["F", "M", "M"]  # "male" and "1" normalised
    assert df["split"].tolist() == ["train", "val", "test"]
    assert df["GOLD"].tolist()[:2] == [0.0, 3.0] and np.isnan(df.loc[2, "GOLD"])
    assert np.isnan(df["age"]).all()  # absent label column -> NaN
    # round trip: writing the validated table and reading it again gives the same frame
    again = root / "elsewhere" / "copy.csv"
    again.parent.mkdir()
    df.to_csv(again, index=False)
    pd.testing.assert_frame_equal(read_manifest(again), df)


def test_missing_required_column(cohort):
    header = "sid,lung_mask,FEV1pp\n"
    msg = _error(_manifest(cohort, rows=["s1,masks/s1.nii.gz,80\n"], header=header))
    assert "'image'" in msg and "required column is missing" in msg


def test_missing_file_names_row_sid_and_column(cohort):
    rows = list(cohort[2])
    rows[1] = rows[1].replace("images/s2.nii.gz,", "images/nope.nii.gz,")
    rows[2] = rows[2].replace("s3,dicom_s3,,", "s3,dicom_s3,masks/s3.nii.gz,")
    msg = _error(_manifest(cohort, rows=rows))
    assert re.search(r"row 2 \(line 3, sid 's2'\), column 'image': file not found: .*nope\.nii\.gz", msg), msg
    assert re.search(r"row 3 \(line 4, sid 's3'\), column 'lung_mask': file not found", msg), msg
    assert "2 problem(s)" in msg


def test_check_files_false_keeps_missing_files_but_not_other_problems(cohort):
    root = cohort[0]
    rows = list(cohort[2])
    rows[1] = rows[1].replace("images/s2.nii.gz,", "images/nope.nii.gz,")
    df = read_manifest(_manifest(cohort, rows=rows), check_files=False)
    assert df["sid"].tolist() == ["s1", "s2", "s3"]  # order and labels kept
    assert df.loc[1, "image"] == str((root / "images" / "nope.nii.gz").resolve())
    assert df.loc[0, "FEV1pp"] == 85.5
    rows[2] = rows[2].replace("s3,", "s1,", 1)  # a duplicated sid is still an error
    msg = _error(_manifest(cohort, rows=rows), check_files=False)
    assert "duplicated sid 's1'" in msg and "file not found" not in msg


def test_empty_image_is_rejected(cohort):
    rows = list(cohort[2])
    rows[0] = rows[0].replace("images/s1.nii.gz", "")
    msg = _error(_manifest(cohort, rows=rows))
    assert "row 1 (line 2, sid 's1'), column 'image': is empty" in msg


def test_duplicated_sid(cohort):
    rows = list(cohort[2])
    rows[2] = rows[2].replace("s3,", "s1,", 1)
    msg = _error(_manifest(cohort, rows=rows))
    assert re.search(r"row 3 \(line 4, sid 's1'\), column 'sid': duplicated sid 's1' \(first at row 1\)", msg), msg


@pytest.mark.parametrize(
    "column, bad, expected",
    [
        ("FEV1pp", "eighty", "cannot parse 'eighty' as a number"),
        ("GOLD", "2.5", "must be a whole number"),
        ("GOLD", "7", "outside the allowed range"),
        ("FEV1_FVC", "72", "ratio, not a percentage"),
        ("event", "maybe", "'maybe' is not an event code: 1 = event (death) observed, 0 = censored (accepted "
                           "spellings, any case: 0, 1, dead, deceased"),
        ("event", "2", "a 1/2 coding (R's Surv: 2 = dead) must be recoded to 0/1"),
        ("emph_fraction", "1.2", "outside the allowed range"),
        ("emph_paraseptal", "-0.1", "outside the allowed range"),
        ("time", "inf", "cannot parse 'inf'"),
        ("sex", "X", "is not one of ['F', 'M']"),
        ("split", "holdout", "is not one of ['test', 'train', 'val']"),
    ],
)
def test_unparsable_label(cohort, column, bad, expected):
    root, header, rows = cohort
    cols = header.strip().split(",")
    cells = rows[1].strip().split(",")
    cells[cols.index(column)] = bad
    rows = [rows[0], ",".join(cells) + "\n", rows[2]]
    msg = _error(_manifest(cohort, rows=rows))
    assert f"row 2 (line 3, sid 's2'), column '{column}'" in msg and expected in msg, msg


def test_missing_manifest_and_unknown_name(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
    with pytest.raises(ManifestError, match="(?s)unknown data manifest 'no-such-source'.*copdgene"):
        resolve_manifest("no-such-source")
    with pytest.raises(ManifestError, match="manifest not found"):
        resolve_manifest(tmp_path / "none.csv")


# --- messages that help a first manifest ---------------------------------------------------------


def _images(root: Path, *sids: str) -> None:
    for sid in sids:
        _write(root / f"{sid}.nii.gz", "x")


def test_column_names_are_matched_ignoring_case(tmp_path):
    _images(tmp_path, "a", "b")
    path = _write(tmp_path / "m.csv", "SID,Image,fev1pp,Gold,EVENT,Time,Group,site\n"
                                      "a,a.nii.gz,80,1,dead,2.5,P1,x\nb,b.nii.gz,60,2,Alive,3,P1,y\n")
    with pytest.warns(ManifestWarning, match="column 'SID' read as 'sid'"):
        df = read_manifest(path)
    assert df["sid"].tolist() == ["a", "b"] and df["FEV1pp"].tolist() == [80.0, 60.0]
    assert df["GOLD"].tolist() == [1.0, 2.0] and df["event"].tolist() == [1.0, 0.0]
    assert df["time"].tolist() == [2.5, 3.0]
    assert df["group"].tolist() == ["P1", "P1"] and df["site"].tolist() == ["x", "y"]
    assert not {"SID", "Image", "fev1pp", "Gold", "EVENT", "Time", "Group"} & set(df.columns)  # renamed, not copied
    notes = df.attrs["manifest_notes"]
    assert "column 'fev1pp' read as 'FEV1pp' (names are matched ignoring case)" in notes and len(notes) == 7


def test_columns_that_differ_only_in_case_are_a_problem(tmp_path):
    _images(tmp_path, "a")
    msg = _error(_write(tmp_path / "m.csv", "sid,image,FEV1pp,fev1pp\na,a.nii.gz,80,81\n"))
    assert "column 'fev1pp': differs from the standard column 'FEV1pp' only in case" in msg
    msg = _error(_write(tmp_path / "m.csv", "sid,image,Age,AGE\na,a.nii.gz,80,81\n"))
    assert "column 'age': columns ['Age', 'AGE'] all read as 'age'" in msg


def test_missing_or_misnamed_columns_get_a_hint(tmp_path):
    _images(tmp_path, "a")
    msg = _error(_write(tmp_path / "m.csv", "subject_id,image_path\na,a.nii.gz\n"))
    assert "column 'sid': required column is missing" in msg and "did you mean 'subject_id'? rename it to 'sid'" in msg
    assert "column 'image': required column is missing" in msg and "did you mean 'image_path'?" in msg
    path = _write(tmp_path / "m.csv", "sid,image,FEV1_pp,pack_year,FEV1\na,a.nii.gz,80,20,2.1\n")
    with pytest.warns(ManifestWarning, match="did you mean 'FEV1pp'"):
        df = read_manifest(path)
    notes = df.attrs["manifest_notes"]
    assert any("'FEV1_pp' is not a standard column" in n and "did you mean 'FEV1pp'?" in n for n in notes), notes
    assert any("'pack_year'" in n and "did you mean 'pack_years'?" in n for n in notes), notes
    assert not any("'FEV1'" in n for n in notes), notes  # FEV1 in litres is another measure: no hint
    assert np.isnan(df["FEV1pp"]).all() and df["FEV1_pp"].tolist() == ["80"]  # kept as an extra, not renamed


@pytest.mark.parametrize("sep, name", [("\t", "tab"), (";", "semicolon"), ("|", "bar")])
def test_separator_is_detected_from_the_header(tmp_path, sep, name):
    _images(tmp_path, "a", "b")
    rows = [["sid", "image", "FEV1pp", "site"], ["a", "a.nii.gz", "80.5", "x y"], ["b", "b.nii.gz", "", "z"]]
    path = _write(tmp_path / "m.csv", "".join(sep.join(r) + "\n" for r in rows))
    with pytest.warns(ManifestWarning, match=f"m.csv is {name}-separated"):
        df = read_manifest(path)
    assert df["sid"].tolist() == ["a", "b"] and df.loc[0, "FEV1pp"] == 80.5 and np.isnan(df.loc[1, "FEV1pp"])
    assert df["site"].tolist() == ["x y", "z"]
    assert df.attrs["manifest_notes"] == [f"m.csv is {name}-separated (detected from its header); read as such"]


def test_separator_rules_and_spreadsheet_exports(tmp_path):
    assert detect_separator("sid,image,FEV1pp\n") == ","
    assert detect_separator("sid;image;note,with comma\n") == ";"
    assert detect_separator("sid\n") == ","
    assert detect_separator("sid\timage\n") == "\t"
    _images(tmp_path, "a")
    # a .tsv that is tab-separated is as expected (no note); a BOM of Excel's "CSV UTF-8" is dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_manifest(_write(tmp_path / "m.tsv", "sid\timage\na\ta.nii.gz\n"))["sid"].tolist() == ["a"]
        (tmp_path / "bom.csv").write_bytes("sid,image\na,a.nii.gz\n".encode("utf-8-sig"))
        assert read_manifest(tmp_path / "bom.csv")["sid"].tolist() == ["a"]
    # a European export: semicolons and decimal commas; the comma gets a hint
    msg = _error(_write(tmp_path / "eu.csv", "sid;image;FEV1pp\na;a.nii.gz;85,5\n"))
    assert "cannot parse '85,5' as a number (a decimal comma? write it with a point)" in msg
    assert "notes:" in msg and "eu.csv is semicolon-separated" in msg  # the note travels with the error


@pytest.mark.parametrize("times, unit", [
    (["1460", "3652", "730"], "look like days: divide by 365.25 (median 1460"),
    (["48", "120", "60"], "look like months (divide by 12) or days (divide by 365.25) (median 60"),
])
def test_survival_times_in_days_or_months_are_flagged(tmp_path, times, unit):
    _images(tmp_path, "a", "b", "c")
    rows = "".join(f"{s},{s}.nii.gz,{t},1\n" for s, t in zip("abc", times))
    msg = _error(_write(tmp_path / "m.csv", "sid,image,time,event\n" + rows))
    assert f"column 'time': the values {unit}" in msg and "'time' is the follow-up in years" in msg, msg
    assert msg.count("column 'time'") == 1  # one problem for the column, not one per row
    years = "".join(f"{s},{s}.nii.gz,{t},1\n" for s, t in zip("abc", ["4", "12.5", "29"]))
    assert read_manifest(_write(tmp_path / "y.csv", "sid,image,time,event\n" + years))["time"].tolist() == [4, 12.5, 29]


def test_event_accepts_common_spellings(tmp_path):
    words = ["dead", "Alive", "DECEASED", "censored", "yes", "no", "True", "false", "1.0", "0", "died", "living", ""]
    sids = [f"s{i}" for i in range(len(words))]
    _images(tmp_path, *sids)
    rows = "".join(f"{s},{s}.nii.gz,{w}\n" for s, w in zip(sids, words))
    df = read_manifest(_write(tmp_path / "m.csv", "sid,image,event\n" + rows))
    assert df["event"].tolist()[:-1] == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0] and np.isnan(df["event"].iloc[-1])


def test_group_column(tmp_path):
    _images(tmp_path, "a", "b", "c", "d")
    df = read_manifest(_write(tmp_path / "m.csv", "sid,image,group\na,a.nii.gz, P7 \nb,b.nii.gz,P7\n"
                                                  "c,c.nii.gz,1001.0\nd,d.nii.gz,\n"))
    assert df["group"].tolist()[:3] == ["P7", "P7", "1001"] and pd.isna(df["group"].iloc[3])  # missing: own group
    assert pd.isna(read_manifest(_write(tmp_path / "n.csv", "sid,image\na,a.nii.gz\n"))["group"]).all()


def test_every_problem_is_kept_on_the_error(tmp_path):
    _images(tmp_path, *[f"s{i}" for i in range(30)])
    rows = "".join(f"s{i},s{i}.nii.gz,x\n" for i in range(30))
    with pytest.raises(ManifestError) as info:
        read_manifest(_write(tmp_path / "m.csv", "sid,image,age\n" + rows))
    assert "30 problem(s)" in str(info.value) and "... and 10 more" in str(info.value)
    assert len(info.value.problems) == 30 and "sid 's29'" in info.value.problems[-1]


def test_relative_manifest_paths_and_names(tmp_path, monkeypatch):
    _images(tmp_path / "cohort", "a")
    csv = _write(tmp_path / "cohort" / "manifest.csv", "sid,image\na,a.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_manifest("cohort/manifest.csv") == csv.resolve()  # relative to the working directory
    assert resolve_manifest("cohort") == csv.resolve()  # a cohort folder stands for its manifest.csv
    assert resolve_manifest("./cohort/../cohort/manifest.csv").is_absolute()
    with pytest.raises(ManifestError) as info:
        resolve_manifest("cohrt/manifest.csv")
    msg = str(info.value)
    assert "manifest not found: 'cohrt/manifest.csv'; tried:" in msg
    assert f"{tmp_path / 'cohrt' / 'manifest.csv'} (relative to the working directory)" in msg
    # names: any case, with a .yaml suffix; unknown ones list the tried files and the closest name
    assert resolve_manifest("COPDGene.yaml") == (manifest_dir() / "copdgene.yaml").resolve()
    with pytest.raises(ManifestError) as info:
        resolve_manifest("copdgen")
    msg = str(info.value)
    assert f"{tmp_path / 'copdgen'} (relative to the working directory)" in msg
    assert str(manifest_dir() / "copdgen.yaml") in msg and "(did you mean 'copdgene'?)" in msg
    with pytest.raises(ManifestError, match="working directory"):
        read_manifest("cohrt/manifest.csv")


def test_yaml_source_columns_match_ignoring_case(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write(data / "s1.nii.gz", "x")
    _write(data / "subjects.csv", "ID,fev1pp_UTAH\ns1,55\n")
    monkeypatch.setenv("TOY_ROOT", str(data))
    path = _source(tmp_path, table="${TOY_ROOT}/subjects.csv", columns={"ID": "sid", "FEV1pp_utah": "FEV1pp"},
                   paths={"image": "{sid}.nii.gz"})
    assert read_manifest(path)["FEV1pp"].tolist() == [55.0]
    path = _source(tmp_path, table="${TOY_ROOT}/subjects.csv", columns={"ID": "sid", "FEV1pp_utahh": "FEV1pp"},
                   paths={"image": "{sid}.nii.gz"})
    assert "'FEV1pp_utahh' (did you mean 'fev1pp_UTAH'?)" in _error(path)


def _source(tmp_path, **fields) -> Path:
    spec = {"name": "toy", "description": "a toy source", "how_to_obtain": "Ask the toy consortium.", **fields}
    return _write(tmp_path / "toy.yaml", yaml.safe_dump(spec))


def test_yaml_source_maps_columns_recodes_and_fills_templates(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for sid in ("A1", "A2"):
        _write(data / "scans" / f"{sid}_INSP.nii.gz", "x")
    _write(data / "tables" / "subjects.csv",
           "sid,FEV1pp_utah,FEV1_FVC_utah,finalGold,gender,days_followed,vital_status,ccenter\n"
           "A1,92.1,0.78,0,2,3652.5,0,NJC\n"
           "A2,35.0,0.41,-1,1,730.5,1,BWH\n")
    monkeypatch.setenv("TOY_ROOT", str(data))
    path = _source(
        tmp_path,
        table="${TOY_ROOT}/tables/subjects.csv",
        root="${TOY_ROOT}",
        columns={"FEV1pp_utah": "FEV1pp", "FEV1_FVC_utah": "FEV1_FVC", "finalGold": "GOLD", "gender": "sex",
                 "vital_status": "event"},
        optional_columns={"days_followed": "time", "not_in_this_table": "age"},
        scale={"time": 1 / 365.25},
        recode={"GOLD": {-1: None}, "sex": {1: "M", 2: "F"}},
        paths={"image": "scans/{sid}_INSP.nii.gz"},
    )
    df = read_manifest(path)
    assert df["sid"].tolist() == ["A1", "A2"]
    assert df["FEV1pp"].tolist() == [92.1, 35.0] and df["FEV1_FVC"].tolist() == [0.78, 0.41]
    assert df.loc[0, "GOLD"] == 0 and np.isnan(df.loc[1, "GOLD"])  # PRISm (-1) recoded to missing
    assert df["sex"].tolist() == ["F", "M"]
    assert df["event"].tolist() == [0.0, 1.0]
    assert df.loc[1, "image"] == str((data / "scans" / "A2_INSP.nii.gz").resolve())
    np.testing.assert_allclose(df["time"], [10.0, 2.0])  # days scaled to years
    assert np.isnan(df["age"]).all()  # an optional column the table lacks is skipped
    assert df["ccenter"].tolist() == ["NJC", "BWH"]  # unmapped source columns are kept


def test_yaml_errors_name_the_table_row(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write(data / "s1.nii.gz", "x")
    _write(data / "subjects.csv", "ID,FEV1pp_utah\ns1,abc\n")
    monkeypatch.setenv("TOY_ROOT", str(data))
    path = _source(tmp_path, table="${TOY_ROOT}/subjects.csv", columns={"ID": "sid", "FEV1pp_utah": "FEV1pp"},
                   paths={"image": "{sid}.nii.gz"})
    msg = _error(path)
    assert "row 1 (line 2, sid 's1'), column 'FEV1pp': cannot parse 'abc'" in msg
    assert str(data / "subjects.csv") in msg


def test_yaml_missing_env_or_table_says_how_to_obtain(tmp_path, monkeypatch):
    monkeypatch.delenv("TOY_ROOT_UNSET", raising=False)
    path = _source(tmp_path, table="${TOY_ROOT_UNSET}/subjects.csv")
    msg = _error(path)
    assert "TOY_ROOT_UNSET is not set" in msg and "Ask the toy consortium." in msg
    path = _source(tmp_path, table=str(tmp_path / "absent.csv"))
    msg = _error(path)
    assert "subject table not found" in msg and "Ask the toy consortium." in msg
    _write(tmp_path / "t.csv", "sid,image\n")
    path = _source(tmp_path, table="t.csv", columns={"FEV1pp_utah": "FEV1pp"})
    assert "FEV1pp_utah" in _error(path)


def test_expand_env_defaults(monkeypatch):
    monkeypatch.setenv("DR_X", "/data/x")
    monkeypatch.delenv("DR_Y", raising=False)
    assert expand_env("${DR_X}/a.csv") == "/data/x/a.csv"
    assert expand_env("${DR_Y:-/fallback}/a.csv") == "/fallback/a.csv"
    assert expand_env("~/a").startswith(str(Path.home()))
    with pytest.raises(ManifestError, match="DR_Y is not set"):
        expand_env("${DR_Y}/a.csv")


def test_resolve_synthetic_generates_once(tmp_path):
    calls = []

    def fake_make(out_dir: Path) -> Path:  # stands in for make_cohort: writes a valid manifest
        calls.append(out_dir)
        _write(out_dir / "img.nii.gz", "x")
        return _write(out_dir / "manifest.csv", "sid,image\nsyn000,img.nii.gz\n")

    first = resolve_manifest("synthetic", out_root=tmp_path, make_synthetic=fake_make)
    assert first == (tmp_path / "synthetic_cohort" / "manifest.csv").resolve()
    assert resolve_manifest("synthetic", out_root=tmp_path, make_synthetic=fake_make) == first
    assert len(calls) == 1
    assert read_manifest(first)["sid"].tolist() == ["syn000"]


def test_resolve_paths_and_source_names(tmp_path):
    csv = _write(tmp_path / "m.csv", "sid,image\n")
    assert resolve_manifest(str(csv)) == csv.resolve()
    assert resolve_manifest("copdgene") == (manifest_dir() / "copdgene.yaml").resolve()
    assert resolve_manifest("MSD_Task06_Lung") == (manifest_dir() / "msd_task06_lung.yaml").resolve()


REQUIRED_SOURCE_FIELDS = ("name", "description", "licence", "access", "size", "labels", "layout", "how_to_obtain",
                          "table")


@pytest.mark.parametrize("path", sorted(manifest_dir().glob("*.yaml")), ids=lambda p: p.stem)
def test_source_files_are_complete(path):
    spec = load_source(path)
    missing = [f for f in REQUIRED_SOURCE_FIELDS if not spec.get(f)]
    assert not missing, f"{path.name} lacks {missing}"
    standard = set(STANDARD_COLUMNS)
    for src, dst in (spec.get("columns") or {}).items():
        assert dst in standard, f"{path.name}: column {src} maps to non-standard {dst}"


def test_every_required_source_has_a_file():
    names = {p.stem for p in manifest_dir().glob("*.yaml")}
    assert {"synthetic", "copdgene", "lidc_idri", "luna16", "mosmeddata", "msd_task06_lung", "stoic2021", "nlst",
            "lung_pet_ct_dx"} <= names


def test_copdgene_mapping(tmp_path, monkeypatch):
    """The COPDGene entry reads a table with COPDGene's own column names."""
    root = tmp_path / "copdgene"
    _write(root / "images" / "10001A" / "10001A_INSP_STD_COPD.nii.gz", "x")
    spec = load_source(manifest_dir() / "copdgene.yaml")
    src_cols = list(spec["columns"])
    values = {"FEV1pp_utah": "55.2", "FEV1_FVC_utah": "0.51", "finalGold": "2", "gender": "1", "Age_Enroll": "63",
              "ATS_PackYears": "40", "sid": "10001A"}
    header = ["sid"] + [c for c in src_cols if c != "sid"]
    row = [values.get(c, "") for c in header]
    _write(root / "subjects.csv", ",".join(header) + "\n" + ",".join(row) + "\n")
    monkeypatch.setenv("COPDGENE_ROOT", str(root))
    df = read_manifest(manifest_dir() / "copdgene.yaml")
    assert df.loc[0, "FEV1pp"] == 55.2 and df.loc[0, "FEV1_FVC"] == 0.51 and df.loc[0, "GOLD"] == 2
    assert df.loc[0, "sex"] == "M" and df.loc[0, "age"] == 63 and df.loc[0, "pack_years"] == 40
    assert Path(df.loc[0, "image"]).name == "10001A_INSP_STD_COPD.nii.gz"
