import numpy as np
import pytest

from drasclr_lib.downstream.folds import iter_folds, make_folds, task_split


def test_folds_partition_and_are_reproducible():
    f1 = make_folds(23, k=5, seed=3)
    f2 = make_folds(23, k=5, seed=3)
    np.testing.assert_array_equal(f1, f2)
    assert set(f1) == set(range(5))
    assert np.bincount(f1).max() - np.bincount(f1).min() <= 1
    assert not np.array_equal(f1, make_folds(23, k=5, seed=4))


def test_stratified_folds_balance_strata_and_survive_rare_classes():
    strata = np.array([0] * 20 + [1] * 10 + [2] * 2 + [np.nan] * 3, dtype=object)
    fold = make_folds(len(strata), k=5, seed=0, strata=strata)
    for f in range(5):
        assert np.sum((fold == f) & (strata == 0)) == 4
        assert np.sum((fold == f) & (strata == 1)) == 2


def test_iter_and_task_split_drop_missing_labels_without_moving_subjects():
    fold = make_folds(20, k=4, seed=0)
    valid = np.ones(20, bool)
    valid[[1, 5, 9]] = False
    seen = []
    for f, train, test in task_split(fold, valid):
        assert np.all(fold[test] == f) and np.all(fold[train] != f)
        assert valid[train].all() and valid[test].all()
        seen.extend(test)
    assert sorted(seen) == sorted(np.flatnonzero(valid))
    assert sum(len(t) for _, _, t in iter_folds(fold)) == 20


@pytest.mark.parametrize("n,k", [(10, 1), (3, 5)])
def test_bad_fold_arguments_raise(n, k):
    with pytest.raises(ValueError):
        make_folds(n, k=k)
