"""Which outcomes the downstream experiment predicts: task specs, their parser and their values.

A task is a manifest column (two for survival) and its kind, which decides the model and metrics:

============  ==============================  =====================================  ==================
kind          columns                         model                                  metrics
============  ==============================  =====================================  ==================
continuous    one numeric column              ridge on pooled embeddings             r2, r2_oof
ordinal       one numeric column (classes)    multinomial logistic regression        accuracy, auc_macro
categorical   one column (numbers or text)    multinomial logistic regression        accuracy, auc_macro
survival      time (years) + event (0/1)      PCA + penalised Cox                    c_index
subtype       none (the store's label maps)   patch-level logistic regression        auc_*, accuracy
============  ==============================  =====================================  ==================

Written as a string (notebook 04's ``TASKS``, ``drasclr downstream --tasks``)::

    FEV1pp:continuous, GOLD:ordinal, time+event:survival, pack_years:continuous

Items are separated by ``,`` or ``;``; ``paper`` stands for the paper's tasks (:data:`PAPER_TASKS`),
``subtype`` for the patch-level subtype task; an empty string means the paper's tasks. Every column
of the store's ``subjects.csv`` (the manifest's columns travel there) can be a task.

The paper's tasks are *optional*: one whose column the cohort lacks is skipped, as before. A task
you name is *required*: a missing column or values of the wrong kind raise :class:`TaskError`
naming the column (and a column of a similar name, e.g. ``fev1pp`` for ``FEV1pp``).
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = ["KINDS", "MAX_CLASSES", "TaskSpec", "TaskError", "PAPER_TASKS", "parse_tasks", "format_tasks",
           "task_values", "task_targets"]

KINDS = ("continuous", "ordinal", "categorical", "survival", "subtype")
#: An ordinal or categorical task with more distinct values than this is almost surely continuous.
MAX_CLASSES = 20
_METRICS = {"continuous": ("r2", "r2_oof"), "ordinal": ("accuracy", "auc_macro"),
            "categorical": ("accuracy", "auc_macro"), "survival": ("c_index",), "subtype": ("auc_macro",)}


class TaskError(ValueError):
    """A task spec that cannot be parsed, or a task column that is missing or has the wrong values."""


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task.

    Attributes:
        name: the task's name in the result table (the column; ``survival`` for ``time+event``,
            ``TIME+EVENT`` for other survival columns; ``subtype``).
        kind: one of :data:`KINDS`.
        columns: the ``subjects.csv`` columns it reads: one, ``(time, event)`` for survival, none for
            ``subtype``.
        required: ``True``: a missing column raises :class:`TaskError`; ``False`` (the paper's tasks):
            the task is skipped when the cohort lacks the column.
    """

    name: str
    kind: str
    columns: tuple[str, ...]
    required: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TaskError(f"task {self.name!r}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        want = {"survival": 2, "subtype": 0}.get(self.kind, 1)
        if len(self.columns) != want:
            raise TaskError(f"task {self.name!r} ({self.kind}) needs {want} column(s), got {list(self.columns)}")

    @property
    def headline(self) -> str:
        """The metric a bar chart shows for this task."""
        return {"continuous": "r2"}.get(self.kind, _METRICS[self.kind][-1])

    def __str__(self) -> str:
        if self.kind == "subtype":
            return "subtype"
        return f"{'+'.join(self.columns)}:{self.kind}"


def _survival(time: str, event: str, required: bool = True) -> TaskSpec:
    name = "survival" if (time, event) == ("time", "event") else f"{time}+{event}"
    return TaskSpec(name, "survival", (time, event), required)


#: The paper's tasks, in the order of its tables; a cohort without a column skips that task.
PAPER_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("FEV1pp", "continuous", ("FEV1pp",), False),
    TaskSpec("FEV1_FVC", "continuous", ("FEV1_FVC",), False),
    TaskSpec("GOLD", "ordinal", ("GOLD",), False),
    TaskSpec("emph_grade", "ordinal", ("emph_grade",), False),
    TaskSpec("paraseptal_grade", "ordinal", ("paraseptal_grade",), False),
    _survival("time", "event", False),
    TaskSpec("subtype", "subtype", (), False),
)


def _parse_item(item: str) -> list[TaskSpec]:
    low = item.lower()
    if low == "paper":
        return list(PAPER_TASKS)
    if low in {"subtype", "subtype:subtype"}:
        return [TaskSpec("subtype", "subtype", ())]
    if ":" not in item:
        raise TaskError(f"task {item!r} has no kind: write COLUMN:KIND, e.g. {item}:continuous "
                        f"(kinds: {', '.join(k for k in KINDS if k != 'subtype')}; TIME+EVENT:survival)")
    cols, kind = (s.strip() for s in item.rsplit(":", 1))
    kind = kind.lower()
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TaskError(f"task {item!r}: unknown kind {kind!r}{hint}; kinds: {', '.join(KINDS)}")
    parts = [c.strip() for c in cols.split("+")]
    if any(not c for c in parts):
        raise TaskError(f"task {item!r}: empty column name")
    if kind == "survival":
        if len(parts) != 2:
            raise TaskError(f"task {item!r}: a survival task is TIME+EVENT:survival (two columns), got {parts}")
        return [_survival(*parts)]
    if len(parts) != 1:
        raise TaskError(f"task {item!r}: only survival takes two columns (TIME+EVENT:survival)")
    return [TaskSpec(parts[0], kind, (parts[0],))]


def parse_tasks(spec: str | Sequence | None) -> tuple[TaskSpec, ...]:
    """Task specs from a string, a list, or ``None``.

    Args:
        spec: ``None``, ``""`` or ``"paper"``: :data:`PAPER_TASKS`; a string of items separated by
            ``,`` or ``;`` (``COLUMN:KIND``, ``TIME+EVENT:survival``, ``subtype``, ``paper``); or a
            sequence of such strings and/or :class:`TaskSpec`.

    Returns:
        The tasks, in the given order (a task named twice is an error).

    Raises:
        TaskError: for an item without a kind, an unknown kind, a survival task without two
            columns, or a task named twice.

    Example:
        >>> [str(t) for t in parse_tasks("FEV1pp:continuous; time+event:survival")]
        ['FEV1pp:continuous', 'time+event:survival']
    """
    if spec is None:
        return PAPER_TASKS
    items: Iterable = [s for s in re.split(r"[,;]", spec)] if isinstance(spec, str) else spec
    tasks: list[TaskSpec] = []
    for item in items:
        if isinstance(item, TaskSpec):
            tasks.append(item)
        elif isinstance(item, str):
            if item.strip():
                tasks.extend(_parse_item(item.strip()))
        else:
            raise TaskError(f"a task must be a string or a TaskSpec, got {type(item).__name__} {item!r}")
    if not tasks:
        return PAPER_TASKS
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"tasks named more than once: {dup}")
    return tuple(tasks)


def format_tasks(tasks: Sequence[TaskSpec]) -> str:
    """The spec string of ``tasks`` (:func:`parse_tasks` reads it back); ``"paper"`` for the paper's."""
    return "paper" if tuple(tasks) == PAPER_TASKS else ", ".join(str(t) for t in tasks)


def _missing(table: pd.DataFrame, column: str, task: TaskSpec, source: str) -> TaskError:
    cols = [str(c) for c in table.columns]
    same_case = [c for c in cols if c.lower() == column.lower()]
    close = same_case or difflib.get_close_matches(column, cols, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return TaskError(f"task {task.name!r} ({task.kind}): {source} has no column {column!r}{hint} "
                     f"(columns: {', '.join(cols)})")


def _numeric(values: pd.Series, column: str, task: TaskSpec, source: str, expect: str = "numeric") -> np.ndarray:
    """Float64 values; NaN for missing; a :class:`TaskError` listing values that are not numbers."""
    if values.dtype == bool:
        values = values.astype(float)
    num = pd.to_numeric(values, errors="coerce")
    bad = values[num.isna() & values.notna() & (values.astype(str).str.strip() != "")]
    if len(bad):
        examples = ", ".join(repr(v) for v in list(dict.fromkeys(bad.tolist()))[:4])
        raise TaskError(f"task {task.name!r} ({task.kind}): column {column!r} of {source} must be {expect}, "
                        f"found {examples} ({len(bad)} subject(s)); "
                        + ("a column of text labels is a categorical task" if task.kind != "survival" else
                           "fix these values in the manifest"))
    return num.to_numpy(dtype=np.float64)


def _check_classes(y: np.ndarray, column: str, task: TaskSpec, source: str) -> None:
    n = len(np.unique(y[np.isfinite(y)]))
    if n > MAX_CLASSES:
        raise TaskError(f"task {task.name!r} ({task.kind}): column {column!r} of {source} has {n} distinct values, "
                        f"more than {MAX_CLASSES} classes: a measurement is a continuous task "
                        f"({column}:continuous)")


def task_values(table: pd.DataFrame, sids: Sequence[str], task: TaskSpec, *, source: str = "the table"):
    """The target of one subject-level task, aligned to ``sids``.

    Args:
        table: subject table indexed by sid (``PatchStore.table``).
        sids: the N subjects, in the order of the embeddings.
        task: a subject-level task (not ``subtype``).
        source: how errors name the table (e.g. ``"patch store X: subjects.csv"``).

    Returns:
        ``None`` when an optional task's column is absent; otherwise ``y (N,) float64`` (NaN =
        missing; categorical text labels as class codes 0..C-1 in sorted order), or for survival
        ``(time (N,), event (N,))`` float64.

    Raises:
        TaskError: a required column is missing; a continuous, ordinal or survival column holds
            text; an ordinal or categorical column has more than :data:`MAX_CLASSES` classes; a
            survival time is negative or an event is not 0/1.
    """
    if task.kind == "subtype":
        raise TaskError("the subtype task reads the store's label patches, not a column")
    absent = [c for c in task.columns if c not in table.columns]
    if absent:
        if not task.required:
            return None
        raise _missing(table, absent[0], task, source)
    cols = [table.loc[list(sids), c] for c in task.columns]
    if task.kind == "categorical":
        values = cols[0]
        num = pd.to_numeric(values, errors="coerce")
        if (num.isna() & values.notna()).any():  # text labels: class codes in sorted order
            text = values.where(values.isna(), values.astype(str).str.strip())
            classes = sorted(set(text.dropna()) - {""})
            code = {c: float(i) for i, c in enumerate(classes)}
            y = np.array([code.get(v, np.nan) if isinstance(v, str) else np.nan for v in text], dtype=np.float64)
        else:
            y = num.to_numpy(dtype=np.float64)
        _check_classes(y, task.columns[0], task, source)
        return y
    if task.kind in {"continuous", "ordinal"}:
        y = _numeric(cols[0], task.columns[0], task, source)
        if task.kind == "ordinal":
            _check_classes(y, task.columns[0], task, source)
        return y
    time = _numeric(cols[0], task.columns[0], task, source, "numeric (years)")
    event = _numeric(cols[1], task.columns[1], task, source, "1 (event observed) or 0 (censored)")
    if np.any(time[np.isfinite(time)] < 0):
        raise TaskError(f"task {task.name!r}: column {task.columns[0]!r} of {source} has negative survival times")
    bad = sorted(float(v) for v in set(event[np.isfinite(event)]) - {0.0, 1.0})
    if bad:
        raise TaskError(f"task {task.name!r}: column {task.columns[1]!r} of {source} must be 1 (event observed) "
                        f"or 0 (censored), found {', '.join(f'{v:g}' for v in bad[:4])}")
    return time, event


def task_targets(store, sids: Sequence[str], tasks: Sequence[TaskSpec], folds: int) -> dict:
    """The targets of the tasks that can run on a patch store, in task order.

    Args:
        store: a ``PatchStore`` (its ``table`` and, for ``subtype``, ``has_labels``).
        sids: the N subjects, in embedding order.
        tasks: the tasks (:func:`parse_tasks`).
        folds: k; a task needs at least k labelled subjects (survival also 2 events).

    Returns:
        ``{task name: y (N,) | (time (N,), event (N,)) | "subtype"}``. Optional tasks (the paper's)
        whose column is absent are left out; so is any task with too few labelled subjects or
        events, with a warning.

    Raises:
        TaskError: as :func:`task_values`; a required ``subtype`` task on a store without label patches.
    """
    source = f"patch store {store.root}: subjects.csv"
    out: dict = {}
    for task in tasks:
        if task.kind == "subtype":
            if store.has_labels:
                out[task.name] = "subtype"
            elif task.required:
                raise TaskError(f"task 'subtype': patch store {store.root} has no label patches (the manifest "
                                "had no label_map column)")
            continue
        values = task_values(store.table, sids, task, source=source)
        if values is None:
            continue
        if task.kind == "survival":
            time, event = values
            n, ok = int((np.isfinite(time) & np.isfinite(event)).sum()), np.nansum(event) >= 2
        else:
            n, ok = int(np.isfinite(values).sum()), True
        if n < folds or not ok:
            warnings.warn(f"task {task.name!r} skipped: {n} labelled subjects"
                          + ("" if ok else " and fewer than 2 events") + f" for {folds} folds ({source})",
                          stacklevel=3)
            continue
        out[task.name] = values
    return out
