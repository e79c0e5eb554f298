"""The parameters the notebook tests run with: each notebook's own committed parameters cell, read
from the file (CI executes the notebooks as committed, with no overrides, as a JupyterLab user's Run
All and `make demo` do). The tests read expected sizes (subjects, steps, fractions) from here."""

from __future__ import annotations

from drasclr_lib.notebook_setup import notebook_parameters
from drasclr_lib.runner import REPO_NOTEBOOKS, list_notebooks

CI_PARAMS: dict[str, dict] = {nb.stem: notebook_parameters(nb) for nb in list_notebooks(REPO_NOTEBOOKS)}

# Encoder checks of notebooks 02-05 (drasclr_lib.evaluation.view_metrics, the same fixed augmented
# views for every encoder compared): a pretrained encoder's `alignment` (cosine of the projections
# of a patch's two views) must exceed its comparison's (the initial weights in 02, random weights in
# 03-05) by this margin. Measured at CI's budget (40 steps of batch 8 on 16 subjects): trained minus
# initial weights +0.43 / +0.48 / +0.47 (pretraining seeds 0 / 1 / 2), MoCo and DrasCLR without
# neighbours +0.43 / +0.44 over random weights; with a frozen learning rate (1e-12: the weights stay,
# only BatchNorm statistics move) +0.009 / +0.016. What the short run learns is this alignment, the
# easy half of its loss; it does not yet separate subjects (separation ~0, retrieval at chance).
ALIGNMENT_MARGIN = 0.1
# Alignment alone rewards an encoder that maps every patch to one vector: a pretrained encoder's mean
# cosine between different subjects' views at one location (`negative_similarity`) must stay below
# this. Measured at CI's budget: 0.96-0.98 for the three pretrained encoders (0.991 after 200 steps);
# a frozen 40-step run without the neighbour loss, whose BatchNorm running variances still carry
# their initial value (0.9^40 of 1, ~15x the real variance in the last layers), gives 0.99994.
MAX_NEGATIVE_SIMILARITY = 0.999
