"""Downstream experiments of the paper with baselines (notebook 04, ``benchmarks/bench_downstream.py``).

- :mod:`~drasclr_lib.downstream.folds`: subject folds drawn once and shared by every method.
- :mod:`~drasclr_lib.downstream.prediction`: ridge (FEV1pp, FEV1/FVC) and logistic regression
  (GOLD, visual grades) with k-fold CV.
- :mod:`~drasclr_lib.downstream.survival`: PCA + penalised Cox, C-index, Kaplan-Meier / log-rank.
- :mod:`~drasclr_lib.downstream.subtypes`: dominant emphysema subtype per patch and its classifier.
- :mod:`~drasclr_lib.downstream.experiment`: :func:`run_downstream`, the whole comparison table.
- :mod:`~drasclr_lib.downstream.ablations`: patch embeddings of the compared encoders (their
  pretraining runs: :mod:`drasclr_lib.training.runs`).
- :mod:`~drasclr_lib.downstream.plots`: bar chart, Kaplan-Meier and subtype-map figures.
"""

from drasclr_lib.downstream.experiment import METHOD_LABELS, DownstreamResult, run_downstream
from drasclr_lib.downstream.folds import make_folds

__all__ = ["METHOD_LABELS", "DownstreamResult", "run_downstream", "make_folds"]
