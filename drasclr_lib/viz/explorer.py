"""Interactive patch explorer: a subject's CT with the atlas patch grid, and what its embeddings say.

Pick a subject, scroll through its axial CT slices (the padded 1 mm grid the patches were cut
from) with every atlas patch crossing the slice drawn as a box, and pick a patch. The explorer then
shows

(a) the patches at the same anatomical location in the most and the least similar subjects
    (cosine similarity of the representation ``h``), and
(b) a heatmap over the subject's lung: every patch box painted with the cosine similarity of its
    embedding to the picked patch's (overlapping boxes are averaged).

``PatchExplorer.widget()`` builds an ipywidgets panel (JupyterLab, Jupyter Notebook, Colab);
``PatchExplorer.figure(...)`` draws the same views as one static matplotlib figure, which is what
:func:`show_explorer` shows when there is no widget front end (papermill, CI, a script).

The volumes it draws come from :mod:`drasclr_lib.viz.volumes` (the re-read CT on the subject's
1 mm grid, or a mosaic of the stored patches; the figure says which).

(About 380 lines, one idea: the explorer, as a static figure and as a widget panel that draw the
same views; the volumes it draws are in :mod:`drasclr_lib.viz.volumes`.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drasclr_lib.viz.maps import LOBE_NAMES
from drasclr_lib.viz.volumes import SubjectVolume, load_subject_volume, similarity_slice

__all__ = [
    "cosine_to",
    "similar_subjects",
    "PatchExplorer",
    "show_explorer",
    "enable_colab_widgets",
]


# -- similarity -------------------------------------------------------------------------------
def cosine_to(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``vectors (M, D)`` to ``query (D,)``: (M,) in [-1, 1].

    A row that is not finite (a patch outside the scan's field of view embeds as NaN) gets NaN,
    and so does every row when the query is not finite; a zero vector gets 0."""
    v = np.asarray(vectors, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if not np.isfinite(q).all():
        return np.full(len(v), np.nan)
    finite = np.isfinite(v).all(axis=1)
    v = np.where(finite[:, None], v, 0.0)
    denom = np.linalg.norm(v, axis=1) * np.linalg.norm(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        sims = np.where(denom > 0, v @ q / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(finite, sims, np.nan)


def similar_subjects(h: np.ndarray, subject: int, loc: int, n: int = 3):
    """The most and least similar other subjects at one location.

    Args:
        h: (N, L, D) embeddings.
        subject: the query subject's index.
        loc: the location index.
        n: how many of each (capped at N - 1).

    Returns:
        ``(most, least)``: lists of ``(subject_index, cosine)``, most similar first / least
        similar first. Subjects whose patch there is invalid (NaN, outside the field of view) are
        left out; both lists are empty when the query patch itself is invalid.
    """
    sims = cosine_to(h[:, loc], h[subject, loc])
    others = np.array([i for i in np.argsort(-sims, kind="stable") if i != subject and np.isfinite(sims[i])],
                      dtype=np.int64)
    n = min(n, len(others))
    most = [(int(i), float(sims[i])) for i in others[:n]]
    least = [(int(i), float(sims[i])) for i in others[::-1][:n]]
    return most, least


# -- the explorer -----------------------------------------------------------------------------
class PatchExplorer:
    """Browse a cohort's patches with their embeddings.

    Args:
        emb: :class:`~drasclr_lib.embed.EmbeddingSet` of the store's subjects.
        store: the ``PatchStore`` the embeddings were computed from.
        subject: the subject shown first (index or id; default the first).
        n_similar: how many most / least similar subjects to show.
        source: volume source, see :func:`load_subject_volume`.
        table: optional per-patch facts (:func:`drasclr_lib.data.patch_store.patch_table`) shown in titles.

    Raises:
        ValueError: when the embeddings and the store disagree (subjects or locations).
    """

    def __init__(self, emb, store, *, subject: int | str | None = None, n_similar: int = 3, source: str = "auto",
                 table: dict | None = None):
        if emb.num_locations != store.num_locations:
            raise ValueError(f"embeddings have {emb.num_locations} locations, the store {store.root} has "
                             f"{store.num_locations}")
        missing = [s for s in emb.sids if s not in set(store.sids)]
        if missing:
            raise ValueError(f"subjects {missing[:5]} of the embeddings are not in the store {store.root}")
        if n_similar < 1:
            raise ValueError(f"n_similar must be positive, got {n_similar}")
        self.emb, self.store, self.n_similar, self.source, self.table = emb, store, int(n_similar), source, table
        self._volumes: dict[str, SubjectVolume] = {}
        self.subject = 0 if subject is None else (
            int(subject) if isinstance(subject, (int, np.integer)) else emb.index(subject))
        if not 0 <= self.subject < emb.num_subjects:
            raise ValueError(f"subject index {self.subject} is outside 0..{emb.num_subjects - 1}")

    def volume(self, subject: int) -> SubjectVolume:
        """The (cached) volume of embedding row ``subject``."""
        sid = self.emb.sids[subject]
        if sid not in self._volumes:
            self._volumes = {sid: load_subject_volume(self.store, sid, source=self.source)}  # keep one in memory
        return self._volumes[sid]

    def default_location(self, subject: int) -> int:
        """A patch worth looking at first: the one with the most emphysema, else the middle one."""
        if self.table is not None:
            e = np.asarray(self.table["emph_fraction"], dtype=np.float64)[subject]
            if np.isfinite(e).any() and np.nanmax(e) > 0:
                return int(np.nanargmax(e))
        return self.emb.num_locations // 2

    def _patch_title(self, subject: int, loc: int) -> str:
        bits = [self.emb.sids[subject]]
        if self.table is not None:
            e = float(np.asarray(self.table["emph_fraction"], dtype=np.float64)[subject, loc])
            if np.isfinite(e):
                bits.append(f"emph {e:.2f}")
        return " ".join(bits)

    def figure(self, subject: int | None = None, loc: int | None = None, k: int | None = None, *,
               heatmap: bool = True):
        """Draw the explorer's views as one matplotlib figure.

        Top row: the CT slice with the patch grid (picked patch in red), and the same slice with the
        similarity heatmap. Bottom row: the picked patch, then the patches at its location in the
        most and the least similar subjects (middle axial slice of each 32³ patch).

        Args:
            subject: embedding row (default: the explorer's subject).
            loc: picked location (default :meth:`default_location`).
            k: axial slice (default: through the picked patch's centre).
            heatmap: draw the similarity heatmap panel.

        Returns:
            The ``matplotlib.figure.Figure``.
        """
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        s = self.subject if subject is None else int(subject)
        loc = self.default_location(s) if loc is None else int(loc)
        if not 0 <= loc < self.emb.num_locations:
            raise ValueError(f"location {loc} is outside 0..{self.emb.num_locations - 1}")
        vol = self.volume(s)
        k = vol.center_slice(loc) if k is None else int(np.clip(k, 0, vol.hu.shape[0] - 1))
        P = vol.patch_size
        most, least = similar_subjects(self.emb.h, s, loc, self.n_similar)
        n_thumb = 1 + len(most) + len(least)
        fig = plt.figure(figsize=(max(10, 1.6 * n_thumb), 8.2))
        gs = fig.add_gridspec(2, max(n_thumb, 2), height_ratios=[3, 1.25])
        half = max(n_thumb, 2) // 2
        ax_ct = fig.add_subplot(gs[0, :half])
        ax_hm = fig.add_subplot(gs[0, half:])
        sl = vol.hu[k]
        for ax in (ax_ct, ax_hm):
            ax.imshow(sl, cmap="gray", vmin=-1024, vmax=240, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        on_slice = vol.patches_on_slice(k)
        for n in on_slice:
            i, j, _ = vol.corners[n]
            ax_ct.add_patch(Rectangle((i - 0.5, j - 0.5), P, P, fill=False, lw=0.6, ec="deepskyblue", alpha=0.7))
        if loc in on_slice:
            i, j, _ = vol.corners[loc]
            for ax in (ax_ct, ax_hm):
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), P, P, fill=False, lw=2.0, ec="red"))
        ax_ct.set_title(f"{self.emb.sids[s]} ({vol.source}), axial slice {k}: {len(on_slice)} patches; "
                        f"picked #{loc} in red", fontsize=9)
        sims = cosine_to(self.emb.h[s], self.emb.h[s, loc])
        if heatmap:
            hm = similarity_slice(vol, sims, k)
            im = ax_hm.imshow(hm, cmap="RdYlBu_r", vmin=-1, vmax=1, alpha=0.55, interpolation="nearest")
            fig.colorbar(im, ax=ax_hm, fraction=0.046, pad=0.02, label="cosine similarity to picked patch")
        ax_hm.set_title("similarity of every patch of this subject to the picked one", fontsize=9)
        thumbs = [(s, None, "picked")] + [(i, c, "most similar") for i, c in most] + \
                 [(i, c, "least similar") for i, c in least]
        for col, (subj, cos, kind) in enumerate(thumbs):
            ax = fig.add_subplot(gs[1, col])
            patch = self.store.get(self.emb.sids[subj], loc)
            ax.imshow(patch[P // 2], cmap="gray", vmin=-1024, vmax=240, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = {"picked": "red", "most similar": "tab:green", "least similar": "tab:purple"}[kind]
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(2)
            head = kind if cos is None else f"{kind}\ncos {cos:.3f}"
            ax.set_title(f"{head}\n{self._patch_title(subj, loc)}", fontsize=7)
        lobe = ""
        if self.table is not None:
            lobe = f", lobe {LOBE_NAMES.get(int(np.asarray(self.table['lobe'])[s, loc]), '?')}"
        fig.suptitle(f"Patch #{loc} (atlas corner {self.emb.atlas_corners[loc].tolist()}{lobe}) of "
                     f"{self.emb.sids[s]}", fontsize=10)
        fig.tight_layout()
        return fig

    def widget(self):
        """The interactive panel: subject, patch and slice controls above the live figure.

        A callback that fails (e.g. a scan that cannot be read) shows its error in the panel, where
        the figure is, instead of only in the front end's log (JupyterLab's log console), and the
        panel keeps reacting to the next change.

        Returns:
            An ``ipywidgets.VBox``; display it in a notebook (JupyterLab, Colab). Widgets can be
            built without a front end; they only render in one. ``panel.controls`` holds the
            widgets by name (``subject``, ``patch``, ``slice``, ``on_slice``, ``heatmap``, ``output``).
        """
        import functools
        import traceback
        from contextlib import contextmanager

        import ipywidgets as w
        import matplotlib.pyplot as plt
        from IPython.display import display

        L = self.emb.num_locations
        s0 = self.subject
        loc0 = self.default_location(s0)
        vol = self.volume(s0)
        subject = w.Dropdown(options=[(sid, i) for i, sid in enumerate(self.emb.sids)], value=s0,
                             description="subject")
        # a wide track: a slider of ~300 slices on the default ~125 px moved 2-3 slices per pixel
        wide = w.Layout(width="460px")
        patch = w.IntSlider(value=loc0, min=0, max=L - 1, description="patch #", continuous_update=False,
                            layout=wide)
        slice_ = w.IntSlider(value=vol.center_slice(loc0), min=0, max=vol.hu.shape[0] - 1,
                             description="axial slice", continuous_update=False, layout=wide)
        on_slice = w.Dropdown(description="on slice", options=[], layout=w.Layout(width="260px"))
        heat = w.Checkbox(value=True, description="similarity heatmap")
        out = w.Output()
        state = {"busy": False}

        @contextmanager
        def quiet():
            """Change widgets without their own callbacks reacting (restored even when a change fails)."""
            before = state["busy"]
            state["busy"] = True
            try:
                yield
            finally:
                state["busy"] = before

        def guarded(callback):
            """Run a callback; on failure show the error in the panel rather than in the log only."""
            @functools.wraps(callback)
            def run(*args):
                try:
                    callback(*args)
                except Exception as exc:  # noqa: BLE001 - any failure: tell the user, keep the panel alive
                    out.outputs = ()
                    out.append_stderr(f"explorer: {self.emb.sids[subject.value]}, patch #{patch.value}, "
                                      f"slice {slice_.value}: {type(exc).__name__}: {exc}\n"
                                      + "".join(traceback.format_exception(exc)[-6:]))
            return run

        def redraw(*_):
            with out:
                out.clear_output(wait=True)
                fig = self.figure(subject.value, patch.value, slice_.value, heatmap=heat.value)
                display(fig)
                plt.close(fig)

        def refresh_on_slice():
            v = self.volume(subject.value)
            idx = v.patches_on_slice(slice_.value)
            with quiet():
                on_slice.options = [("pick a patch on this slice", -1)] + [(f"#{n}", int(n)) for n in idx]
                on_slice.value = -1

        def on_subject(change):
            self.subject = change["new"]
            v = self.volume(change["new"])
            with quiet():
                slice_.max = v.hu.shape[0] - 1
                slice_.value = v.center_slice(patch.value)
            refresh_on_slice()
            redraw()

        def on_patch(change):
            if state["busy"]:
                return
            with quiet():
                slice_.value = self.volume(subject.value).center_slice(change["new"])  # jump to the patch
            refresh_on_slice()
            redraw()

        def on_slice_change(change):
            if state["busy"]:
                return
            refresh_on_slice()
            redraw()

        def on_pick(change):
            if state["busy"] or change["new"] is None or change["new"] < 0:
                return
            with quiet():
                patch.value = change["new"]  # keep the slice where the user is
            redraw()

        subject.observe(guarded(on_subject), names="value")
        patch.observe(guarded(on_patch), names="value")
        slice_.observe(guarded(on_slice_change), names="value")
        on_slice.observe(guarded(on_pick), names="value")
        heat.observe(guarded(redraw), names="value")
        refresh_on_slice()
        redraw()
        panel = w.VBox([w.HBox([subject, patch, heat]), w.HBox([slice_, on_slice]), out])
        panel.controls = {"subject": subject, "patch": patch, "slice": slice_, "on_slice": on_slice,
                          "heatmap": heat, "output": out}
        return panel


def enable_colab_widgets() -> bool:
    """On Colab, turn on its custom widget manager, which ipywidgets 8 panels need to render there.

    Returns:
        True on Colab (the manager is enabled), False elsewhere (JupyterLab needs nothing).
    """
    import sys

    if "google.colab" not in sys.modules:
        return False
    from google.colab import output  # noqa: PLC0415 - exists only on Colab

    output.enable_custom_widget_manager()
    return True


def show_explorer(explorer: PatchExplorer, *, interactive: bool | None = None, save_to: str | os.PathLike | None = None,
                  locations: int = 2):
    """Show the explorer as widgets, or as static figures where no widget front end exists.

    Args:
        explorer: the :class:`PatchExplorer`.
        interactive: ``True`` displays the widget panel; ``False`` draws static figures; ``None``
            decides from the environment variable ``DRASCLR_INTERACTIVE`` (``"0"`` = static),
            default interactive. Notebooks pass their ``INTERACTIVE`` parameter (``False`` under
            papermill / CI, where no front end renders widgets).
        save_to: folder where static figures are saved (``explorer_<sid>_<loc>.png``).
        locations: how many static views (the patch with most emphysema, then the middle one).

    Returns:
        The widget panel, or the list of saved figure paths (empty when ``save_to`` is None).
    """
    from IPython.display import display

    if interactive is None:
        interactive = os.environ.get("DRASCLR_INTERACTIVE", "1") != "0"
    if interactive:
        enable_colab_widgets()
        panel = explorer.widget()
        display(panel)
        return panel
    import matplotlib.pyplot as plt

    from drasclr_lib.viz.maps import save_figure

    s = explorer.subject
    locs = [explorer.default_location(s), explorer.emb.num_locations // 2][:max(1, locations)]
    saved = []
    for loc in dict.fromkeys(locs):  # unique, in order
        fig = explorer.figure(s, loc)
        if save_to is not None:
            saved.append(save_figure(fig, Path(save_to) / f"explorer_{explorer.emb.sids[s]}_{loc}.png"))
        plt.show()
        plt.close(fig)
    return saved
