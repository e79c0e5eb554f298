"""Task specs: the parser, the paper's default, and the values a task reads (with errors naming the column)."""

import numpy as np
import pandas as pd
import pytest

from drasclr_lib.downstream.tasks import (MAX_CLASSES, PAPER_TASKS, TaskError, TaskSpec, format_tasks, parse_tasks,
                                          task_values)


def test_parse_the_paper_default_and_a_custom_list():
    for empty in (None, "", " ", "paper", "PAPER", []):
        assert parse_tasks(empty) == PAPER_TASKS
    assert [t.name for t in PAPER_TASKS] == ["FEV1pp", "FEV1_FVC", "GOLD", "emph_grade", "paraseptal_grade",
                                            "survival", "subtype"]
    assert not any(t.required for t in PAPER_TASKS)
    tasks = parse_tasks(" FEV1pp:continuous; GOLD : Ordinal, sex:categorical,os_years+death:survival,subtype ")
    assert [(t.name, t.kind, t.columns) for t in tasks] == [
        ("FEV1pp", "continuous", ("FEV1pp",)), ("GOLD", "ordinal", ("GOLD",)), ("sex", "categorical", ("sex",)),
        ("os_years+death", "survival", ("os_years", "death")), ("subtype", "subtype", ())]
    assert all(t.required for t in tasks)
    assert parse_tasks("time+event:survival")[0].name == "survival"  # the paper's name for the paper's columns
    # the spec string round-trips; "paper" inside a list expands to the (optional) paper tasks
    assert parse_tasks(format_tasks(tasks)) == tasks
    assert format_tasks(PAPER_TASKS) == "paper"
    both = parse_tasks("paper, pack_years:continuous")
    assert both[:-1] == PAPER_TASKS and both[-1] == TaskSpec("pack_years", "continuous", ("pack_years",))
    assert parse_tasks([TaskSpec("x", "ordinal", ("x",)), "y:continuous"])[1].name == "y"


@pytest.mark.parametrize("spec,match", [
    ("FEV1pp", "no kind.*FEV1pp:continuous"),
    ("FEV1pp:continous", "did you mean 'continuous'"),
    ("time:survival", "two columns"),
    ("a+b:continuous", "only survival"),
    ("GOLD:ordinal,GOLD:categorical", "more than once"),
    (":ordinal", "empty column"),
])
def test_bad_specs_say_what_to_write(spec, match):
    with pytest.raises(TaskError, match=match):
        parse_tasks(spec)


@pytest.fixture()
def table():
    return pd.DataFrame({
        "FEV1pp": [80.0, 60.0, np.nan, 40.0], "fev_text": ["80", "high", "60", "low"],
        "GOLD": [0, 1, 2, np.nan], "sex": ["M", "F", None, "M "], "many": np.arange(4.0) * 1.5,
        "t": [1.0, 2.5, 3.0, np.nan], "e": [1, 0, 1, 1], "e_text": ["dead", "alive", "1", "0"],
        "t_neg": [1.0, -2.0, 1.0, 1.0], "e_two": [0, 1, 2, 1],
    }, index=["a", "b", "c", "d"])


def test_task_values_by_kind(table):
    sids = ["d", "a", "b", "c"]  # aligned to the given order, not the table's
    y = task_values(table, sids, TaskSpec("FEV1pp", "continuous", ("FEV1pp",)))
    np.testing.assert_array_equal(y, [40.0, 80.0, 60.0, np.nan])
    y = task_values(table, sids, TaskSpec("GOLD", "ordinal", ("GOLD",)))
    np.testing.assert_array_equal(y, [np.nan, 0, 1, 2])
    # text classes become codes in sorted order (F=0, M=1), whitespace stripped, missing stays NaN
    y = task_values(table, sids, TaskSpec("sex", "categorical", ("sex",)))
    np.testing.assert_array_equal(y, [1.0, 1.0, 0.0, np.nan])
    t, e = task_values(table, sids, parse_tasks("t+e:survival")[0])
    np.testing.assert_array_equal(t, [np.nan, 1.0, 2.5, 3.0])
    np.testing.assert_array_equal(e, [1, 1, 0, 1])


def test_task_errors_name_the_column(table):
    sids = list(table.index)
    with pytest.raises(TaskError, match=r"no column 'fev1pp'; did you mean 'FEV1pp'"):
        task_values(table, sids, TaskSpec("fev1pp", "continuous", ("fev1pp",)))
    with pytest.raises(TaskError, match=r"no column 'FEV1p'.*did you mean 'FEV1pp'"):
        task_values(table, sids, TaskSpec("FEV1p", "continuous", ("FEV1p",)))
    with pytest.raises(TaskError, match=r"'fev_text'.*must be numeric, found 'high', 'low'.*categorical"):
        task_values(table, sids, TaskSpec("fev_text", "continuous", ("fev_text",)))
    with pytest.raises(TaskError, match=r"'e_text'.*1 \(event observed\) or 0 \(censored\), found 'dead', 'alive'"):
        task_values(table, sids, parse_tasks("t+e_text:survival")[0])
    with pytest.raises(TaskError, match="'t_neg'.*negative"):
        task_values(table, sids, parse_tasks("t_neg+e:survival")[0])
    with pytest.raises(TaskError, match=r"'e_two'.*censored\), found 2$"):
        task_values(table, sids, parse_tasks("t+e_two:survival")[0])
    big = pd.DataFrame({"x": np.arange(MAX_CLASSES + 1.0)}, index=[f"s{i}" for i in range(MAX_CLASSES + 1)])
    with pytest.raises(TaskError, match=r"21 distinct values.*x:continuous"):
        task_values(big, list(big.index), TaskSpec("x", "ordinal", ("x",)))
    # the paper's tasks are optional: an absent column skips the task instead of failing
    assert task_values(table, sids, PAPER_TASKS[1]) is None
    assert task_values(table, sids, TaskSpec("many", "continuous", ("many",))) is not None
