"""The synthetic lung-CT cohort: the offline default data source of every notebook.

``make_cohort(out_dir, n_subjects, seed)`` writes chest CTs (HU, RAS affine, anisotropic
spacing) with lung masks, lobe maps and voxel-level emphysema subtype labels, plus a clinical
table generated from the latent disease (:mod:`.clinical`); ``plot_subject`` shows a subject.

Modules: :mod:`.anatomy` (template shapes, branching trees), :mod:`.render` (one subject on a
voxel grid), :mod:`.clinical` (latents -> lung function, grades, survival), :mod:`.cohort`
(files, manifest, CLI), :mod:`.plot`.
"""

from drasclr_lib.data.synthetic.clinical import gold_stage
from drasclr_lib.data.synthetic.cohort import MANIFEST_COLUMNS, SIZES, cli_main, make_cohort, resolve_size
from drasclr_lib.data.synthetic.plot import load_subject, plot_subject

__all__ = ["make_cohort", "plot_subject", "load_subject", "cli_main", "gold_stage", "resolve_size", "SIZES",
           "MANIFEST_COLUMNS"]
