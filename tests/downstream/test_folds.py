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


def test_grouped_folds_never_split_a_patient():
    rng = np.random.default_rng(0)
    # 40 scans of 18 patients: 1-4 visits each, visits of one patient next to each other or not
    sizes = [1, 2, 3, 4, 2, 1, 3, 2, 2, 1, 4, 2, 3, 1, 2, 3, 2, 2]
    groups = np.array([f"P{p:02d}" for p, n in enumerate(sizes) for _ in range(n)], dtype=object)
    groups = groups[rng.permutation(len(groups))]
    gold = np.array([int(g[1:]) % 3 for g in groups])  # one GOLD per patient
    for seed in range(5):
        fold = make_folds(len(groups), k=5, seed=seed, strata=gold, groups=groups)
        assert set(fold) == set(range(5))
        for g in set(groups):
            assert len(set(fold[groups == g])) == 1, (seed, g, fold[groups == g])
        np.testing.assert_array_equal(fold, make_folds(len(groups), k=5, seed=seed, strata=gold, groups=groups))
    # strata are balanced over patients: each GOLD class (6 patients) puts 2 patients in each of 3 folds
    fold = make_folds(len(groups), k=3, seed=0, strata=gold, groups=groups)
    for c in range(3):
        patients_per_fold = [len(set(groups[(fold == f) & (gold == c)])) for f in range(3)]
        assert patients_per_fold == [2, 2, 2], (c, patients_per_fold)


def test_singleton_groups_give_the_ungrouped_folds_and_too_few_patients_raise():
    strata = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(make_folds(12, k=3, seed=2, strata=strata, groups=np.arange(12)),
                                  make_folds(12, k=3, seed=2, strata=strata))
    with pytest.raises(ValueError, match="3 folds from 2 patient groups"):
        make_folds(6, k=3, groups=np.array(["a", "a", "a", "b", "b", "b"]))
    with pytest.raises(ValueError, match="groups must have shape"):
        make_folds(6, k=3, groups=np.arange(5))
