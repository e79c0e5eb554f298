"""Direction spread of the anatomical neighbours on the published 581 landmarks.

Prints, for the published code's argsort, the old lowest-index rule and our tie rule (seeds
0-2): the share of each neighbour offset, the share per axis, the locations whose two picks lie
on one axis, and how often our pair equals the published code's (docs/preprocessing_atlas_patches_cohort.md).

    python benchmarks/neighbour_spread.py [--reference ../shared/reference]
"""
import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import pairwise_distances

from drasclr_lib.preprocess.landmarks import nearest_neighbors

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--reference", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "reference"))
c = np.load(Path(ap.parse_args().reference) / "atlas_patch_loc.npy")
L = len(c)
d = pairwise_distances(c, metric='euclidean')
pub = np.stack([np.argsort(d[i])[1:3] for i in range(L)])
full = d.copy(); np.fill_diagonal(full, np.inf)
low = np.lexsort((np.broadcast_to(np.arange(L), full.shape), full), axis=1)[:, :2]
def show(name, nb):
    off = c[nb] - c[:, None]; u, n = np.unique(off.reshape(-1, 3), axis=0, return_counts=True)
    ax = np.argmax(np.abs(off), -1)
    o = np.argsort(-n)
    print(name, ' '.join(f'{tuple(int(v) for v in u[i])}:{n[i]/nb.size:.1%}' for i in o),
          '| axes', ' '.join(f'{a}:{v:.1%}' for a, v in zip('ijk', np.bincount(ax.ravel(), minlength=3) / nb.size)),
          f'| same-axis pairs {np.mean(ax[:,0]==ax[:,1]):.1%}',
          f'| = published ordered {np.mean(np.all(nb==pub,1)):.1%}, as set {np.mean(np.all(np.sort(nb,1)==np.sort(pub,1),1)):.1%}')
show('published argsort', pub); show('lowest index', low)
for s in range(3):
    t = time.perf_counter(); nb = nearest_neighbors(c, 2, seed=s); dt = time.perf_counter() - t
    show(f'new seed={s} ({dt*1e3:.0f} ms)', nb)
