"""Downstream experiments of the paper with baselines (notebook 04, ``benchmarks/bench_downstream.py``,
``drasclr downstream``).

- :mod:`~drasclr_lib.downstream.folds`: subject folds drawn once and shared by every method (whole
  patients per fold when the manifest has a ``group`` column).
- :mod:`~drasclr_lib.downstream.tasks`: which outcomes: the paper's tasks or manifest columns with
  a kind (continuous, ordinal, categorical, survival), parsed from ``"FEV1pp:continuous, ..."``.
- :mod:`~drasclr_lib.downstream.prediction`: ridge (continuous targets) and logistic regression
  (ordinal / categorical targets) with k-fold CV.
- :mod:`~drasclr_lib.downstream.survival`: PCA + penalised Cox, C-index, Kaplan-Meier / log-rank.
- :mod:`~drasclr_lib.downstream.subtypes`: dominant emphysema subtype per patch and its classifier.
- :mod:`~drasclr_lib.downstream.experiment`: :func:`run_downstream`, the whole comparison table.
- :mod:`~drasclr_lib.downstream.ablations`: patch embeddings of the compared encoders (their
  pretraining runs: :mod:`drasclr_lib.training.runs`).
- :mod:`~drasclr_lib.downstream.plots`: bar chart, Kaplan-Meier and subtype-map figures.
- :mod:`~drasclr_lib.downstream.cli`: the ``drasclr downstream`` command.
"""

from drasclr_lib.downstream.experiment import METHOD_LABELS, DownstreamResult, run_downstream
from drasclr_lib.downstream.folds import make_folds
from drasclr_lib.downstream.tasks import PAPER_TASKS, TaskError, TaskSpec, parse_tasks

__all__ = ["METHOD_LABELS", "DownstreamResult", "run_downstream", "make_folds", "PAPER_TASKS", "TaskError",
           "TaskSpec", "parse_tasks"]
