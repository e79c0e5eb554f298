"""The clinical model of the synthetic cohort: latent disease -> lung function, grades, survival.

Latent variables of a subject (drawn by :func:`sample_latents`):

- ``severity`` s in [0, 1]: emphysema severity. A quarter of the subjects have none (s = 0); the
  rest draw s ~ Beta(1.3, 2.0). The emphysema target fraction of lung voxels is
  ``0.45 * s ** 1.1``, split over subtypes by mixture weights ~ Dirichlet(2, 1.2, 0.6)
  (centrilobular, panlobular, paraseptal); paraseptal is capped at 6 % of the lung.
- ``airway_wall`` a in [0, 1]: airway wall thickening (non-emphysema disease), ~ Beta(1.2, 3).
  It thickens the airway walls in the image and lowers lung function, but adds no emphysema.
- ``age`` = 50 + 14 s + N(0, 7), clipped to [40, 85] years; ``sex`` M or F with p = 0.5;
  ``pack_years`` = 8 + 45 s + 20 a + Gamma(2, 6), clipped at 0.

Clinical values, from the *measured* emphysema fractions of the rendered label map
(``e_cl``, ``e_pl``, ``e_ps``) and the latents. The functional emphysema burden is
``E = e_cl + 1.3 e_pl + 0.4 e_ps`` (paraseptal disease spares function):

- ``FEV1pp`` = 102 - 240 E - 30 a - 0.15 (age - 60) + N(0, 5), clipped to [12, 130].
- ``FEV1_FVC`` = 0.80 - 1.3 E - 0.20 a + N(0, 0.035), clipped to [0.25, 0.95].
- ``GOLD`` by the GOLD rules: FEV1/FVC < 0.70 -> stage 1 (FEV1pp >= 80), 2 (>= 50), 3 (>= 30),
  4 (< 30); otherwise 0.
- ``emph_grade`` (0-5, visual): the total emphysema percentage read with 10 % multiplicative
  noise, binned at 0.5, 3, 8, 15, 25 %.
- ``paraseptal_grade`` (0-3): the paraseptal percentage binned at 0.2, 1, 3 %.
- Survival: Weibull proportional hazards, shape k = 1.5, scale 10 years, linear predictor
  ``eta = 5.0 E + 1.2 a + 0.05 (age - 65)``; event time ``T = 10 (-ln U / exp(eta)) ** (1/k)``;
  independent censoring ``C ~ Uniform(3, 12)`` years (administrative end of follow-up);
  ``time = min(T, C)``, ``event = T <= C``.

All draws use the subject's own clinical random stream, so fixing one latent (e.g.
``airway_wall``) leaves the other draws unchanged.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_latents", "clinical_table_row", "gold_stage", "EMPH_GRADE_BINS", "PARASEPTAL_GRADE_BINS"]

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
    return {"severity": severity, "w_centrilobular": float(mix[0]), "w_panlobular": float(mix[1]),
            "w_paraseptal": float(mix[2]), "airway_wall": airway, "sex": sex, "age_noise": age_noise,
            "pack_noise": pack_noise}


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


def clinical_table_row(latents: dict, measured: dict, rng: np.random.Generator) -> dict:
    """Clinical values of one subject from its latents and measured emphysema fractions.

    Args:
        latents: from :func:`sample_latents` (possibly with fixed values).
        measured: ``emph_centrilobular``, ``emph_panlobular``, ``emph_paraseptal`` (fractions).
        rng: the subject's clinical stream.

    Returns:
        dict with FEV1pp, FEV1_FVC, GOLD, emph_grade, paraseptal_grade, age, sex, pack_years,
        time, event.
    """
    s, a = latents["severity"], latents["airway_wall"]
    e_cl, e_pl, e_ps = measured["emph_centrilobular"], measured["emph_panlobular"], measured["emph_paraseptal"]
    burden = e_cl + 1.3 * e_pl + 0.4 * e_ps
    z = rng.standard_normal(4)
    age = float(np.clip(50 + 14 * s + latents["age_noise"], 40, 85))
    fev1pp = float(np.clip(102 - 240 * burden - 30 * a - 0.15 * (age - 60) + 5 * z[0], 12, 130))
    ratio = float(np.clip(0.80 - 1.3 * burden - 0.20 * a + 0.035 * z[1], 0.25, 0.95))
    total_pct = 100 * (e_cl + e_pl + e_ps) * float(np.exp(0.1 * z[2]))
    emph_grade = int(np.searchsorted(EMPH_GRADE_BINS, total_pct, side="right"))
    ps_grade = int(np.searchsorted(PARASEPTAL_GRADE_BINS, 100 * e_ps, side="right"))
    eta = 5.0 * burden + 1.2 * a + 0.05 * (age - 65)
    u_t, u_c = rng.random(2)
    t_event = 10.0 * (-np.log(max(u_t, 1e-12)) / np.exp(eta)) ** (1 / 1.5)
    t_cens = 3.0 + 9.0 * u_c
    return {"FEV1pp": round(fev1pp, 2), "FEV1_FVC": round(ratio, 4), "GOLD": gold_stage(round(fev1pp, 2), round(ratio, 4)),
            "emph_grade": emph_grade, "paraseptal_grade": ps_grade, "age": round(age, 1), "sex": latents["sex"],
            "pack_years": round(max(0.0, 8 + 45 * s + 20 * a + latents["pack_noise"]), 1),
            "time": round(float(min(t_event, t_cens)), 3), "event": int(t_event <= t_cens)}
