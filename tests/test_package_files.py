"""The files a citable package carries agree with each other: LICENSE, CITATION.cff, CHANGELOG.md,
pyproject.toml and the package version."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import drasclr_lib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject(key: str) -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(rf"^{key}\s*=\s*(.+)$", text, re.M).group(1).strip()


def test_licence_is_mit_everywhere_and_names_the_atlas_notice():
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License\n\nCopyright (c) ") and "the DrasCLR toolkit contributors" in licence
    assert _pyproject("license") == '{text = "MIT"}'
    notice = re.search(r"(drasclr_lib/data/published_atlas/NOTICE)", licence).group(1)
    assert (ROOT / notice).is_file() and "Copyright (c) 2023 batmanlab" in (ROOT / notice).read_text(encoding="utf-8")


def test_citation_file_matches_the_package_and_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    assert cff["version"] == drasclr_lib.__version__ == _pyproject("version").strip('"')
    paper = cff["preferred-citation"]
    assert paper["type"] == "article" and paper["journal"] == "Medical Image Analysis"
    assert paper["doi"] == "10.1016/j.media.2023.103062" and paper["doi"] in (ROOT / "README.md").read_text(encoding="utf-8")
    assert [a["family-names"] for a in paper["authors"]] == ["Yu", "Sun", "Chen", "Reynolds", "Chaudhary",
                                                              "Batmanghelich"]


def test_changelog_has_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(drasclr_lib.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)
