"""The clinical model of the synthetic cohort: latent disease -> lung function, grades, survival.

Calibrated so that density alone cannot win (``python -m drasclr_lib.data.synthetic.calibration
MANIFEST`` measures it; ``docs/synthetic_cohort.md`` gives the figures):

- In COPDGene, %LAA-950 correlates with FEV1 % predicted at roughly r = -0.5 to -0.65 (R² about
  0.25-0.45): airway disease, the pattern and distribution of emphysema, and factors CT does not
  show carry the rest. Here %LAA-950 + lung volume explain FEV1pp with out-of-fold R² about 0.35;
  the disease the image shows but density misses (subtype mix, airway wall thickening, mucus
  plugging) about 0.3 more; noise that no image carries the remaining third.
- Visual emphysema patterns predict death independently of %LAA-950 (COPDGene, 3,171 smokers,
  Radiology 2018: adjusted hazard ratios 1.7 for mild centrilobular up to 5.0 for confluent
  emphysema). Here the hazard of panlobular (confluent, destructive) emphysema per lung fraction is
  15 times that of centrilobular and paraseptal emphysema adds none, so a Cox model on %LAA-950 +
  age leaves a significant likelihood-ratio gain for the subtype fractions.

Latent variables of a subject (drawn by :func:`sample_latents`; every one is drawn in the image
at a scale a 32 mm patch at 1 mm sees, and written to the manifest):

- ``severity`` s in [0, 1]: emphysema severity. A quarter of the subjects have none (s = 0); the
  rest draw s ~ Beta(1.3, 2.0). The emphysema target fraction of lung voxels is
  ``0.45 * s ** 1.1``, split over subtypes by mixture weights ~ Dirichlet(2, 1.2, 0.6)
  (centrilobular: upper-zone holes; panlobular: lower-lobe attenuation loss with vessel pruning;
  paraseptal: subpleural bullae, capped at 6 % of the lung).
- ``airway_wall`` a in [0, 1] ~ Beta(1.2, 3): airway wall thickening (up to 2.5 times the wall).
- ``mucus_plugging`` m in [0, 1] ~ Beta(0.8, 2): the share of distal airways (radius < 2.5 mm)
  whose lumen is filled with mucus, each with a 1.5-2.5 mm tree-in-bud nodule at its end. It
  removes a little air from the airway lumens, so %LAA-950 barely changes.
- ``age`` = 50 + 14 s + N(0, 7), clipped to [40, 85] years; ``sex`` M or F with p = 0.5;
  ``pack_years`` = 8 + 45 s + 20 a + Gamma(2, 6), clipped at 0.

Clinical values, from the *measured* emphysema fractions of the rendered label map
(``e_cl``, ``e_pl``, ``e_ps``) and the latents, with the coefficients of :data:`COEF`. The
functional emphysema burden is ``E = e_cl + 1.6 e_pl + 0.2 e_ps`` (panlobular destroys more
alveolar surface per voxel, paraseptal disease spares function):

- ``FEV1pp`` = 106 - 115 E - 40 a - 40 m + N(0, 10), clipped to [12, 130] (a percentage of the
  predicted value, so age does not enter).
- ``FEV1_FVC`` = 0.86 - 0.9 E - 0.15 a - 0.15 m + N(0, 0.05), clipped to [0.25, 0.95].
- ``GOLD`` by the GOLD rules: FEV1/FVC < 0.70 -> stage 1 (FEV1pp >= 80), 2 (>= 50), 3 (>= 30),
  4 (< 30); otherwise 0.
- ``emph_grade`` (0-5, visual): the total emphysema percentage read with 10 % multiplicative
  noise, binned at 0.5, 3, 8, 15, 25 %.
- ``paraseptal_grade`` (0-3): the paraseptal percentage binned at 0.2, 1, 3 %.
- Survival: Weibull proportional hazards, shape k = 1.5, scale 10 years, linear predictor
  ``eta = 1.0 e_cl + 15 e_pl + 0 e_ps + 0.8 a + 0.8 m + 0.05 (age - 65)``; event time
  ``T = 10 (-ln U / exp(eta)) ** (1/k)``; independent censoring ``C ~ Uniform(3, 12)`` years
  (administrative end of follow-up); ``time = min(T, C)``, ``event = T <= C``.

:data:`ORACLE_COLUMNS` are the manifest columns that carry everything the labels were generated
from except the noise: the benchmark's ceiling ("oracle") uses them as features.

All draws use the subject's own clinical random stream, so fixing one latent (e.g.
``airway_wall``) leaves the other draws unchanged.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_latents", "clinical_table_row", "expected_fev1pp", "COEF", "ORACLE_COLUMNS", "gold_stage", "EMPH_GRADE_BINS", "PARASEPTAL_GRADE_BINS"]

#: emphysema percent thresholds of the visual grades 1..5
EMPH_GRADE_BINS = (0.5, 3.0, 8.0, 15.0, 25.0)
#: paraseptal percent thresholds of grades 1..3
PARASEPTAL_GRADE_BINS = (0.2, 1.0, 3.0)


def sample_latents(rng: np.random.Generator, *, healthy_fraction: float = 0.25) -> dict:
    """Draw the latent disease and demographics of one subject (see the module docstring)."""
    u = rng.random(8)
    healthy = u[0] < healthy_fraction
    severity = 0.0 if healthy else float(rng.beta(1.3, 2.0))
    mix = rng.dirichlet([2.0, 1.2, 0.6])
    airway = float(rng.beta(1.2, 3.0))
    sex = "M" if u[1] < 0.5 else "F"
    age_noise = float(rng.normal(0, 7))
    pack_noise = float(rng.gamma(2.0, 6.0))
    mucus = float(rng.beta(0.8, 2.0))
    return {"severity": severity, "w_centrilobular": float(mix[0]), "w_panlobular": float(mix[1]),
            "w_paraseptal": float(mix[2]), "airway_wall": airway, "mucus_plugging": mucus, "sex": sex,
            "age_noise": age_noise, "pack_noise": pack_noise}


def emphysema_targets(latents: dict) -> tuple[float, float, float]:
    """Target lung fractions (centrilobular, panlobular, paraseptal) of the latent severity."""
    total = 0.45 * latents["severity"] ** 1.1
    f_cl = total * latents["w_centrilobular"]
    f_pl = total * latents["w_panlobular"]
    f_ps = min(total * latents["w_paraseptal"], 0.06)
    return f_cl, f_pl, f_ps


def gold_stage(fev1pp, fev1_fvc):
    """GOLD stage 0-4 (array or scalar): obstruction FEV1/FVC < 0.7, then FEV1pp 80/50/30."""
    fev1pp, ratio = np.asarray(fev1pp, float), np.asarray(fev1_fvc, float)
    stage = np.where(fev1pp >= 80, 1, np.where(fev1pp >= 50, 2, np.where(fev1pp >= 30, 3, 4)))
    out = np.where(ratio < 0.7, stage, 0)
    return out.astype(int) if out.ndim else int(out)


#: coefficients of the clinical model (see the module docstring)
COEF = {
    # functional burden E = e_cl + k_pl e_pl + k_ps e_ps (panlobular destroys more, paraseptal spares)
    "k_pl": 1.6, "k_ps": 0.2,
    # FEV1 % predicted
    "fev1_0": 106.0, "fev1_E": 115.0, "fev1_a": 40.0, "fev1_m": 40.0, "fev1_sd": 10.0,
    # FEV1/FVC
    "ratio_0": 0.86, "ratio_E": 0.9, "ratio_a": 0.15, "ratio_m": 0.15, "ratio_sd": 0.05,
    # survival linear predictor: per unit lung fraction of each subtype, per unit latent, per year
    "h_cl": 1.0, "h_pl": 15.0, "h_ps": 0.0, "h_a": 0.8, "h_m": 0.8, "h_age": 0.05,
}
#: the generator's latent ground truth that drives the labels (the benchmark's "oracle" features)
ORACLE_COLUMNS = ("emph_centrilobular", "emph_panlobular", "emph_paraseptal", "airway_wall", "mucus_plugging",
                  "age")


def _burden(c: dict, e_cl, e_pl, e_ps):
    """Functional emphysema burden ``E = e_cl + k_pl e_pl + k_ps e_ps`` (scalars or arrays)."""
    return e_cl + c["k_pl"] * e_pl + c["k_ps"] * e_ps


def _fev1pp_mean(c: dict, burden, a, m):
    """FEV1pp before noise and clipping: the one formula the table and :func:`expected_fev1pp` share."""
    return c["fev1_0"] - c["fev1_E"] * burden - c["fev1_a"] * a - c["fev1_m"] * m


def expected_fev1pp(table, coef: dict | None = None) -> np.ndarray:
    """FEV1pp without its noise (and without the clipping), from a manifest's ground-truth columns.

    Args:
        table: the manifest (DataFrame or mapping of arrays) with ``emph_centrilobular``,
            ``emph_panlobular``, ``emph_paraseptal``, ``airway_wall``, ``mucus_plugging``.
        coef: coefficients (default :data:`COEF`).

    Returns:
        (N,) the model's FEV1 % predicted before noise: what a perfect reading of the image gives.
    """
    c = {**COEF, **(coef or {})}
    col = lambda k: np.asarray(table[k], float)  # noqa: E731
    burden = _burden(c, col("emph_centrilobular"), col("emph_panlobular"), col("emph_paraseptal"))
    return _fev1pp_mean(c, burden, col("airway_wall"), col("mucus_plugging"))


def clinical_table_row(latents: dict, measured: dict, rng: np.random.Generator, coef: dict | None = None) -> dict:
    """Clinical values of one subject from its latents and measured emphysema fractions.

    Args:
        latents: from :func:`sample_latents` (possibly with fixed values).
        measured: ``emph_centrilobular``, ``emph_panlobular``, ``emph_paraseptal`` (fractions).
        rng: the subject's clinical stream.
        coef: coefficients (default :data:`COEF`; a partial dict overrides those keys).

    Returns:
        dict with FEV1pp, FEV1_FVC, GOLD, emph_grade, paraseptal_grade, age, sex, pack_years,
        time, event.
    """
    c = {**COEF, **(coef or {})}
    s, a, m = latents["severity"], latents["airway_wall"], latents.get("mucus_plugging", 0.0)
    e_cl, e_pl, e_ps = measured["emph_centrilobular"], measured["emph_panlobular"], measured["emph_paraseptal"]
    burden = _burden(c, e_cl, e_pl, e_ps)
    z = rng.standard_normal(4)
    age = float(np.clip(50 + 14 * s + latents["age_noise"], 40, 85))
    fev1pp = float(np.clip(_fev1pp_mean(c, burden, a, m) + c["fev1_sd"] * z[0], 12, 130))
    ratio = float(np.clip(c["ratio_0"] - c["ratio_E"] * burden - c["ratio_a"] * a - c["ratio_m"] * m
                          + c["ratio_sd"] * z[1], 0.25, 0.95))
    total_pct = 100 * (e_cl + e_pl + e_ps) * float(np.exp(0.1 * z[2]))
    emph_grade = int(np.searchsorted(EMPH_GRADE_BINS, total_pct, side="right"))
    ps_grade = int(np.searchsorted(PARASEPTAL_GRADE_BINS, 100 * e_ps, side="right"))
    eta = (c["h_cl"] * e_cl + c["h_pl"] * e_pl + c["h_ps"] * e_ps + c["h_a"] * a + c["h_m"] * m
           + c["h_age"] * (age - 65))
    u_t, u_c = rng.random(2)
    t_event = 10.0 * (-np.log(max(u_t, 1e-12)) / np.exp(eta)) ** (1 / 1.5)
    t_cens = 3.0 + 9.0 * u_c
    return {"FEV1pp": round(fev1pp, 2), "FEV1_FVC": round(ratio, 4), "GOLD": gold_stage(round(fev1pp, 2), round(ratio, 4)),
            "emph_grade": emph_grade, "paraseptal_grade": ps_grade, "age": round(age, 1), "sex": latents["sex"],
            "pack_years": round(max(0.0, 8 + 45 * s + 20 * a + latents["pack_noise"]), 1),
            "time": round(float(min(t_event, t_cens)), 3), "event": int(t_event <= t_cens)}
