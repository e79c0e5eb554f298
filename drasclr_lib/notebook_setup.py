"""What every notebook does before its own work: profiles, the output root, and its inputs.

The notebooks run on their own committed parameters (the ``laptop`` profile: a 2-core CPU, the
synthetic default cohort, minutes per notebook); ``PROFILE = "paper"`` switches a notebook to the
published settings of ``drasclr_lib/notebook_params.json`` (:func:`use_profile`). Each notebook
also runs alone, as a fresh Colab runtime does: when the cohort, the patch store or the pretrained
checkpoint of an earlier notebook is missing, :func:`input_manifest`, :func:`input_store` and
:func:`input_checkpoint` make it with the same library calls and the earlier notebook's committed
settings, saying what they do and how long it took.

Also :func:`notebook_parameters`, the parameters cell of a notebook file read without running it
(the runner, the tests and ``tools/explorer_check`` use it).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from drasclr_lib.utils import output_dir, output_root

__all__ = ["PARAMS_FILE", "PROFILES", "load_profile", "use_profile", "use_output_root", "fit_batch",
           "input_manifest", "input_store", "input_checkpoint", "notebook_parameters"]

PARAMS_FILE = Path(__file__).resolve().parent / "notebook_params.json"
PROFILES = ("laptop", "paper")

# Measured on 2 idle CPU cores (make demo, laptop profile): what an input made here costs
_SECONDS_PER_SYNTHETIC_SUBJECT = 1.7  # notebook 00: 27 s for 16 "demo" subjects with 2 workers
_SECONDS_PER_PREPROCESSED_SUBJECT = 5.5  # notebook 01: 88 s for 16 subjects with 2 workers, PAD 30
_SECONDS_PER_PRETRAINING_STEP = 0.8  # notebook 02: 40 steps of batch 8 in ~35 s


def load_profile(name: str, path: str | os.PathLike = PARAMS_FILE) -> dict[str, dict]:
    """One parameter profile of ``notebook_params.json``: notebook stem -> parameters.

    The file maps profile -> stem -> parameters; its top-level ``"_comment"`` holds the notes (JSON
    carries no comments) and is not a profile.

    Args:
        name: ``"laptop"`` (what every notebook's parameters cell holds) or ``"paper"``.
        path: the JSON file of profiles (default: the one shipped with the package).

    Returns:
        ``{stem: {PARAMETER: value}}``.

    Raises:
        KeyError: when the file has no profile ``name``.
    """
    profiles = {k: v for k, v in json.loads(Path(path).read_text(encoding="utf-8")).items() if not k.startswith("_")}
    if name not in profiles:
        raise KeyError(f"no parameter profile {name!r} in {path} (profiles: {sorted(profiles)})")
    return profiles[name]


def use_profile(profile: str, notebook: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter values a notebook runs with under ``profile``, printed.

    ``"laptop"`` keeps the parameters cell as it is. ``"paper"`` replaces each parameter of the
    notebook's ``paper`` profile **that still holds its laptop value**; a parameter you changed
    (in the cell or with ``papermill -p``) is kept and listed as kept.

    Args:
        profile: ``"laptop"`` or ``"paper"`` (the notebook's ``PROFILE``).
        notebook: the notebook's stem (``"02_pretraining"``).
        current: the notebook's parameter values (``globals()``).

    Returns:
        ``{PARAMETER: value}`` to apply (``globals().update(...)``); empty for ``"laptop"``.

    Raises:
        ValueError: an unknown profile.
    """
    if profile not in PROFILES:
        raise ValueError(f"{notebook}: PROFILE must be one of {PROFILES}, not {profile!r}")
    if profile == "laptop":
        print(f"PROFILE 'laptop': the values of the parameters cell (a 2-core CPU, minutes); "
              "PROFILE = 'paper' switches to the published settings")
        return {}
    laptop, paper = load_profile("laptop").get(notebook, {}), load_profile("paper").get(notebook, {})
    apply, kept = {}, []
    for name, value in paper.items():
        if name in current and current[name] != laptop.get(name, current[name]):
            kept.append(f"{name}={current[name]!r}")
        else:
            apply[name] = value
    print("PROFILE 'paper' (the published settings; meant for a GPU and a cohort of hundreds of scans): "
          + ", ".join(f"{k} {current.get(k)!r} -> {v!r}" for k, v in apply.items()))
    if kept:
        print("  kept because you set them: " + ", ".join(kept))
    return apply


def use_output_root(path: str = "") -> Path:
    """Set the output root of this kernel (``DRASCLR_OUT``) from a notebook's ``OUTPUT_ROOT``.

    Args:
        path: empty keeps :func:`~drasclr_lib.utils.output_root` (``$DRASCLR_OUT``, else the
            clone's ``outputs/``); a folder sets ``DRASCLR_OUT`` for every later call. On Colab a
            folder under ``/content/drive`` mounts Google Drive first (a permission prompt), so the
            results outlive the runtime.

    Returns:
        The output root (created).
    """
    if path:
        folder = Path(path).expanduser()
        drive = Path("/content/drive")
        if "google.colab" in sys.modules and drive in folder.parents and not (drive / "MyDrive").exists():
            from google.colab import drive as colab_drive  # noqa: PLC0415 - only on Colab

            colab_drive.mount(str(drive))
        os.environ["DRASCLR_OUT"] = str(folder.resolve())
    root = output_dir()
    print(f"outputs: {root}" + ("" if path else " (set OUTPUT_ROOT or DRASCLR_OUT to write elsewhere)"))
    return root


def fit_batch(batch_size: int, num_subjects: int, what: str = "BATCH_SIZE") -> int:
    """A batch of one location that the cohort can form, with a message when it had to shrink.

    A batch holds different subjects' patches of one location, and the location's queue of
    negatives needs other subjects besides the batch: the batch is at most half the subjects.

    Args:
        batch_size: the asked batch (the notebook's parameter).
        num_subjects: subjects in the patch store.
        what: the parameter's name, for the message.

    Returns:
        ``min(batch_size, max(2, num_subjects // 2))``.

    Raises:
        ValueError: fewer than 2 subjects, or a batch below 2.
    """
    if num_subjects < 2 or batch_size < 2:
        raise ValueError(f"{what}={batch_size} on {num_subjects} subjects: a contrastive batch needs at least 2 "
                         "subjects of one location")
    fitted = min(int(batch_size), max(2, num_subjects // 2))
    if fitted != batch_size:
        print(f"{what} {batch_size} -> {fitted}: a batch holds distinct subjects of one location, and this cohort has "
              f"{num_subjects} (at most half of them per batch, so the queue holds the others)")
    return fitted


def _timed(what: str, estimate_s: float):
    """Print what is made and its expected duration; the returned callable prints the actual one."""
    print(f"[inputs] {what} (about {estimate_s:.0f} s on 2 idle CPU cores) ...", flush=True)
    t0 = time.perf_counter()
    return lambda: print(f"[inputs] done in {time.perf_counter() - t0:.0f} s", flush=True)


def input_manifest(data_manifest: str = "synthetic") -> Path:
    """The notebook's cohort: ``resolve_manifest(data_manifest)``, making the synthetic one if needed.

    The synthetic cohort is made as notebook 00 makes it (its committed ``N_SUBJECTS``, ``SEED``,
    ``SIZE``, ``WORKERS``) in ``$DRASCLR_OUT/synthetic_cohort/``, so a later notebook 00 finds it.

    Args:
        data_manifest: the notebook's ``DATA_MANIFEST`` (``"synthetic"``, ``"lung-pet-ct-dx"``, a
            ``data_manifest/`` source name or a manifest path).

    Returns:
        The manifest file.

    Raises:
        drasclr_lib.data.manifest.ManifestError: an unknown source or a missing file.
    """
    from drasclr_lib.data.sources import resolve_manifest
    from drasclr_lib.data.synthetic import make_cohort

    p = load_profile("laptop")["00_synthetic_cohort"]

    def make(out_dir: Path) -> Path:
        done = _timed(f"notebook 00 has not run here: making the synthetic cohort, {p['N_SUBJECTS']} subjects "
                      f"(make_cohort, size {p['SIZE']!r}, seed {p['SEED']}) in {out_dir}",
                      _SECONDS_PER_SYNTHETIC_SUBJECT * p["N_SUBJECTS"] * 2 / max(1, p["WORKERS"]))
        path = make_cohort(out_dir, p["N_SUBJECTS"], p["SEED"], size=p["SIZE"], workers=p["WORKERS"])
        done()
        return path

    return resolve_manifest(data_manifest, make_synthetic=make)


def input_store(store: str = "", data_manifest: str = "synthetic"):
    """The patch store a notebook reads: ``store``, or notebook 01's, made here when missing.

    Args:
        store: the notebook's ``STORE`` parameter; empty for ``$DRASCLR_OUT/patch_store``.
        data_manifest: the cohort to preprocess when notebook 01's store is missing.

    Returns:
        The :class:`~drasclr_lib.data.patch_store.PatchStore`.

    Raises:
        FileNotFoundError: ``store`` was given and is not a patch store.
    """
    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.data.patch_store.layout import STORE_META, SUBJECTS_TABLE

    if store:
        return PatchStore(Path(store).expanduser())
    root = output_dir("patch_store")
    if (root / STORE_META).exists() and (root / SUBJECTS_TABLE).exists():
        return PatchStore(root)
    from drasclr_lib.preprocess.atlas_source import resolve_atlas
    from drasclr_lib.preprocess.cohort import load_manifest, preprocess_cohort

    p = load_profile("laptop")["01_preprocessing"]
    df = load_manifest(input_manifest(data_manifest))
    state = "is incomplete: resuming it" if (root / STORE_META).exists() else "is missing"
    done = _timed(f"notebook 01's patch store {state}: preprocessing {len(df)} subjects (preprocess_cohort, atlas "
                  f"'auto', PAD {p['PAD']}, {p['WORKERS']} workers) into {root}",
                  _SECONDS_PER_PREPROCESSED_SUBJECT * len(df) * 2 / max(1, p["WORKERS"]))
    atlas = resolve_atlas("auto", store=root, manifest=df, segment=p["SEGMENT_LUNGS"], pad=p["PAD"])
    result = preprocess_cohort(df, root, atlas=atlas, workers=p["WORKERS"], segment=p["SEGMENT_LUNGS"], pad=p["PAD"])
    done()
    return result


def input_checkpoint(checkpoint: str = "", store=None, data_manifest: str = "synthetic") -> Path:
    """The DrasCLR checkpoint a notebook reads: ``checkpoint``, or notebook 02's, trained when missing.

    The short pretraining uses notebook 02's committed settings (``pretrain_or_reuse`` into
    ``$DRASCLR_OUT/02_pretraining``), so notebook 02 run later reuses it.

    Args:
        checkpoint: the notebook's ``CHECKPOINT``; empty for ``$DRASCLR_OUT/02_pretraining/checkpoint.pt``.
        store: the patch store to pretrain on (default :func:`input_store`).
        data_manifest: the cohort, when the store too must be made.

    Returns:
        The checkpoint file.

    Raises:
        FileNotFoundError: ``checkpoint`` was given and does not exist.
    """
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"CHECKPOINT {path} does not exist")
        return path
    path = output_dir("02_pretraining") / "checkpoint.pt"
    if path.exists():
        return path
    from drasclr_lib.training import PretrainConfig, pretrain_or_reuse

    store = store if store is not None else input_store("", data_manifest)
    p = load_profile("laptop")["02_pretraining"]
    cfg = PretrainConfig(store=str(store.root), out_dir=str(path.parent), epochs=p["EPOCHS"],
                         batch_size=fit_batch(p["BATCH_SIZE"], store.num_subjects), lr=p["LR"],
                         queue_size=p["QUEUE_SIZE"], workers=p["WORKERS"], max_steps=p["MAX_STEPS"] or None,
                         log_every=p["LOG_EVERY"], seed=p["SEED"],
                         num_neighbors=p["NEIGHBORS"], neighbor_weight=p["BETA"], augment=p["AUGMENT"])
    done = _timed(f"notebook 02's checkpoint is missing: a short pretraining, {p['MAX_STEPS']} steps of batch "
                  f"{cfg.batch_size} (pretrain_or_reuse) into {path.parent}",
                  _SECONDS_PER_PRETRAINING_STEP * p["MAX_STEPS"])
    made, _ = pretrain_or_reuse(cfg)
    done()
    return made


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The committed values of a notebook's ``parameters`` cell, read without running it.

    Args:
        notebook: an ``.ipynb`` file.

    Returns:
        ``{NAME: value}`` in the cell's order.

    Raises:
        ValueError: the notebook has no cell tagged ``parameters``, or a value is not a literal.
    """
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            values = {}
            for node in ast.parse(src).body:
                if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                    raise ValueError(f"{notebook}: the parameters cell holds only NAME = literal lines")
                values[node.targets[0].id] = ast.literal_eval(node.value)
            return values
    raise ValueError(f"{notebook}: no code cell tagged 'parameters'")
