"""How hard the synthetic cohort is: what density explains, what the rest of the image adds, survival.

:func:`calibration_report` reads a cohort manifest and answers the three questions the clinical
model (:mod:`.clinical`) is calibrated against:

1. How much of FEV1pp do %LAA-950 and lung volume explain? (``r2_density``: out-of-fold R² of a
   linear model, repeated 10-fold CV; real COPD cohorts: about 0.25-0.45.)
2. How much more does the disease the image shows but density misses explain? (``r2_visible``:
   the same with the subtype fractions, airway wall thickening and mucus plugging added;
   ``r2_visible_gain`` = ``r2_visible - r2_density``.) ``r2_oracle`` adds everything the generator
   used (the ceiling; the rest is noise no image carries).
3. Does survival depend on the subtype pattern beyond %LAA-950? A Cox model on %LAA-950 + age
   against one with the three subtype fractions added: likelihood-ratio statistic (3 degrees of
   freedom) and its p-value.

``python -m drasclr_lib.data.synthetic.calibration MANIFEST`` prints the report as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["DENSITY_FEATURES", "VISIBLE_FEATURES", "SUBTYPE_FEATURES", "oof_r2", "cox_lr_test",
           "calibration_report"]

#: what a density-only clinical reading gives
DENSITY_FEATURES = ("laa950", "lung_volume_ml")
#: the subtype fractions (ground truth of the label map)
SUBTYPE_FEATURES = ("emph_centrilobular", "emph_panlobular", "emph_paraseptal")
#: image-visible disease beyond density: subtypes, airway walls, mucus plugging
VISIBLE_FEATURES = (*DENSITY_FEATURES, *SUBTYPE_FEATURES, "airway_wall", "mucus_plugging")


def oof_r2(X: np.ndarray, y: np.ndarray, *, folds: int = 10, repeats: int = 5, seed: int = 0) -> float:
    """Out-of-fold R² of ordinary least squares, averaged over repeated k-fold splits.

    Args:
        X: (N, F) features (a column of ones is added).
        y: (N,) target.
        folds, repeats, seed: the repeated k-fold CV.

    Returns:
        Mean over repeats of ``1 - SSE_oof / SS_tot`` (pooled out-of-fold predictions).
    """
    X = np.column_stack([np.ones(len(y)), np.asarray(X, float)])
    y = np.asarray(y, float)
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        fold = rng.permutation(len(y)) % folds
        pred = np.empty_like(y)
        for k in range(folds):
            te = fold == k
            beta, *_ = np.linalg.lstsq(X[~te], y[~te], rcond=None)
            pred[te] = X[te] @ beta
        scores.append(1.0 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()))
    return float(np.mean(scores))


def cox_lr_test(table: pd.DataFrame, base: list[str], extra: list[str], *, duration: str = "time",
                event: str = "event") -> dict:
    """Likelihood-ratio test of adding ``extra`` covariates to a Cox model on ``base``.

    Returns:
        dict with ``lr`` (2 x log-likelihood gain), ``df``, ``p`` and the hazard ratios per
        standard deviation of the full model (``hr_per_sd``).
    """
    from lifelines import CoxPHFitter
    from scipy.stats import chi2

    cols = [*base, *extra]
    df = table[[*cols, duration, event]].astype(float).copy()
    df[cols] = (df[cols] - df[cols].mean()) / df[cols].std(ddof=0).replace(0, 1)
    small = CoxPHFitter().fit(df[[*base, duration, event]], duration, event)
    full = CoxPHFitter().fit(df, duration, event)
    lr = 2.0 * (full.log_likelihood_ - small.log_likelihood_)
    return {"lr": float(lr), "df": len(extra), "p": float(chi2.sf(lr, len(extra))),
            "hr_per_sd": {c: float(np.exp(full.params_[c])) for c in cols}}


def calibration_report(manifest: str | Path | pd.DataFrame, *, seed: int = 0) -> dict:
    """The cohort's calibration figures (see the module docstring).

    Args:
        manifest: a synthetic cohort's ``manifest.csv`` (or its table).
        seed: seed of the repeated CV splits.

    Returns:
        dict: ``n``, ``r2_density``, ``r2_visible``, ``r2_visible_gain``, ``r2_oracle``,
        ``r_laa950_fev1pp`` (Pearson r), ``event_rate``, ``cox_subtypes`` (:func:`cox_lr_test`
        of the subtype fractions over %LAA-950 + age).

    Raises:
        ValueError: naming the columns the manifest lacks.
    """
    from drasclr_lib.data.synthetic.clinical import ORACLE_COLUMNS

    table = manifest if isinstance(manifest, pd.DataFrame) else pd.read_csv(manifest)
    need = sorted(set(VISIBLE_FEATURES) | set(ORACLE_COLUMNS) | {"FEV1pp", "time", "event", "age"})
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"the manifest lacks the column(s) {missing} of the synthetic cohort (generator version "
                         f">= 2); regenerate it with make_cohort")
    y = table["FEV1pp"].to_numpy(float)
    r2 = {name: oof_r2(table[list(cols)].to_numpy(float), y, seed=seed)
          for name, cols in (("density", DENSITY_FEATURES), ("visible", VISIBLE_FEATURES),
                             ("oracle", tuple(dict.fromkeys((*VISIBLE_FEATURES, *ORACLE_COLUMNS)))))}
    return {"n": int(len(table)), "r2_density": r2["density"], "r2_visible": r2["visible"],
            "r2_visible_gain": r2["visible"] - r2["density"], "r2_oracle": r2["oracle"],
            "r_laa950_fev1pp": float(np.corrcoef(table["laa950"], y)[0, 1]),
            "event_rate": float(table["event"].mean()),
            "cox_subtypes": cox_lr_test(table, ["laa950", "age"], list(SUBTYPE_FEATURES))}


if __name__ == "__main__":  # pragma: no cover - thin CLI
    print(json.dumps(calibration_report(sys.argv[1]), indent=2))
