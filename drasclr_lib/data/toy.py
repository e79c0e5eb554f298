"""A tiny patch store with known structure, written without any preprocessing run.

For tests, benchmarks and trying the API: :func:`make_toy_store` writes a store whose subjects
have a known disease level, so a pipeline that learns nothing is told apart from one that does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_toy_store"]


def make_toy_store(root, n_subjects: int = 12, grid: tuple = (3, 3, 2), patch_size: int = 32, seed: int = 0,
                   with_labels: bool = True):
    """Write a tiny patch store with a known structure.

    Locations sit on a ``grid`` of atlas corners 26 voxels apart. Each subject has a disease level
    ``d`` in [0, 1]; its patches are lung-like noise around -850 HU with a location-dependent mean
    shift and a fraction ``d`` of voxels set near -990 HU (emphysema, label 1). Returns the
    store's path.
    """
    import pandas as pd

    from drasclr_lib.data.patch_store import finalize_store, write_store_meta, write_subject
    from drasclr_lib.preprocess.atlas import nearest_neighbors, normalize_locations

    rng = np.random.default_rng(seed)
    corners = np.array([[26 * i + 10, 26 * j + 10, 26 * k + 10] for i in range(grid[0]) for j in range(grid[1])
                        for k in range(grid[2])])
    write_store_meta(root, corners, normalize_locations(corners), nearest_neighbors(corners, 2),
                     patch_size=patch_size, atlas="toy")
    L, P = len(corners), patch_size
    rows = []
    for s in range(n_subjects):
        sid = f"toy{s:03d}"
        d = s / max(n_subjects - 1, 1)
        base = -850 + 15 * np.arange(L)[:, None, None, None]
        vol = base + rng.normal(0, 40, size=(L, P, P, P))
        emph = rng.random((L, P, P, P)) < 0.5 * d
        vol[emph] = -990 + rng.normal(0, 10, size=emph.sum())
        labels = emph.astype(np.uint8) if with_labels else None
        write_subject(root, sid, vol.astype(np.int16), label_patches=labels,
                      record={"lung_volume_l": 5.0, "laa950": float(emph.mean() * 100)})
        rows.append({"sid": sid, "emph_fraction": float(emph.mean()), "FEV1pp": 100 - 60 * d, "GOLD": int(round(4 * d))})
    finalize_store(root, pd.DataFrame(rows))
    return root
