"""The files a citable package carries agree with each other: LICENSE, CITATION.cff, CHANGELOG.md,
pyproject.toml and the package version; a wheel carries every package and the data-source files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
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


# -- what a pip install carries: every package, the data-source files, found outside the clone ----

def _listed_packages() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]


def test_every_package_of_the_source_tree_is_listed_in_pyproject():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "drasclr_lib").rglob("__init__.py")}
    listed = set(_listed_packages())
    assert found - listed == set(), f"pyproject.toml [tool.setuptools] packages misses {sorted(found - listed)}"
    assert listed - found == {"drasclr_lib.data_manifest"}, sorted(listed - found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as a wheel (no dependencies, no build isolation: offline)."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(ROOT, build / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", "notebooks", "benchmarks", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(build / "src")], check=True, capture_output=True, text=True)
    (whl,) = out.glob("drasclr_lib-*.whl")
    return whl


def test_the_wheel_carries_the_data_sources_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.name for p in (ROOT / "data_manifest").glob("*.yaml")}
    assert sources and {f"drasclr_lib/data_manifest/{s}" for s in sources} <= names
    assert "drasclr_lib/data_manifest/README.md" in names
    assert {"drasclr_lib/notebook_params.json", "drasclr_lib/data/published_atlas/atlas_patch_loc.npy"} <= names


def test_an_installed_wheel_resolves_copdgene_outside_the_clone(wheel, tmp_path):
    """The wheel unpacked into a folder of its own (as pip installs it), imported from a working
    directory outside the clone: the data sources come from the package, the outputs go to the
    working directory."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    code = ("import drasclr_lib, json; from drasclr_lib.data.sources import resolve_manifest, manifest_dir; "
            "from drasclr_lib.utils import output_root, project_root; "
            "print(json.dumps([drasclr_lib.__file__, str(resolve_manifest('copdgene')), str(manifest_dir()), "
            "str(output_root()), str(project_root())]))")
    env = {k: v for k, v in os.environ.items() if k not in ("DRASCLR_OUT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    module, copdgene, folder, out, clone = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(site), module  # the wheel's copy, not the clone's
    assert Path(copdgene) == site / "drasclr_lib" / "data_manifest" / "copdgene.yaml"
    assert Path(folder) == site / "drasclr_lib" / "data_manifest"
    assert Path(out) == work.resolve() / "outputs" and clone == "None"


def _run_setup_cell(cwd: Path, pythonpath: str, prelude: str = "") -> subprocess.CompletedProcess:
    import importlib

    setup = importlib.import_module("tools.nbtemplate").SETUP  # every notebook's first code cell
    env = {k: v for k, v in os.environ.items() if k not in ("DRASCLR_OUT", "PYTHONPATH")}
    env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", prelude + setup], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_notebooks_setup_cell_with_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    res = _run_setup_cell(tmp_path, str(site))
    assert res.returncode == 0, res.stderr
    assert f"from {site / 'drasclr_lib' / '__init__.py'}" in res.stdout
    assert f"outputs: {tmp_path.resolve() / 'outputs'}" in res.stdout


def test_the_setup_cell_outside_a_clone_asks_for_repo_url_instead_of_guessing_one(tmp_path):
    # drasclr_lib made unimportable, as on a fresh Colab runtime; no clone around, REPO_URL empty
    res = _run_setup_cell(tmp_path, "", prelude="import sys; sys.modules['drasclr_lib'] = None\n")
    assert res.returncode != 0
    assert "set REPO_URL above to the address of the repository you cloned" in res.stderr
    assert "pip" not in res.stdout  # nothing was installed
