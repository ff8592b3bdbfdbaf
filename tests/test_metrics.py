"cxrlt.metrics against independent references: scikit-learn, a float64 hand loop for ECE, explicit resampling."
import json, time, warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlt.labels import CLASSES, class_groups
from cxrlt.metrics import (Evaluation, average_precision_and_auc, bootstrap_ci, bootstrap_replicates, bootstrap_weights,
                           check_predictions, evaluate, expected_calibration_error, f1_at_thresholds, paired_bootstrap,
                           per_class_ece, plot_reliability, reliability_table)

TOL = 1e-9


def make_data(seed, n=400, n_classes=30, decimals=None, prevalence=None):
    "Labels with long-tailed prevalence and informative probabilities; `decimals` rounds them to create ties."
    rng = np.random.default_rng(seed)
    prev = np.geomspace(0.4, 0.005, n_classes) if prevalence is None else np.asarray(prevalence)
    y = (rng.random((n, n_classes)) < prev).astype(int)
    p = np.clip(0.25 * y + 0.75 * rng.random((n, n_classes)), 0, 1)
    return y, (np.round(p, decimals) if decimals is not None else p)


def sk_quiet(f, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return f(*a, **kw)


def ece_reference(y, p, n_bins=15):
    "ECE by hand in float64: assign each pair to its bin by comparisons, then sum count-weighted gaps."
    y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    counts, pos_sum, prob_sum = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for yi, pi in zip(y.tolist(), p.tolist()):
        b = n_bins - 1
        for k in range(n_bins):
            if k / n_bins <= pi < (k + 1) / n_bins:
                b = k
                break
        counts[b] += 1; pos_sum[b] += yi; prob_sum[b] += pi
    return sum(abs(pos_sum[b] - prob_sum[b]) for b in range(n_bins) if counts[b]) / len(y)


# ---------------------------------------------------------------- AP, AUC, F1 equal scikit-learn

@pytest.mark.parametrize('seed,decimals', [(0, None), (1, 2), (2, 1), (3, 3)])
def test_ap_auc_equal_sklearn(seed, decimals):
    y, p = make_data(seed, decimals=decimals)
    ap, auc = average_precision_and_auc(y, p)
    for c in range(y.shape[1]):
        if y[:, c].sum() == 0:
            assert np.isnan(ap[c]) and np.isnan(auc[c])
            continue
        assert abs(ap[c] - average_precision_score(y[:, c], p[:, c])) < TOL, c
        if y[:, c].sum() < len(y): assert abs(auc[c] - roc_auc_score(y[:, c], p[:, c])) < TOL, c


@pytest.mark.parametrize('decimals', [None, 2])
def test_weighted_ap_auc_f1_equal_sklearn(decimals):
    y, p = make_data(5, n=300, n_classes=6, decimals=decimals, prevalence=[0.5, 0.3, 0.2, 0.1, 0.05, 0.7])
    w = np.random.default_rng(9).integers(0, 4, len(y)).astype(float)   # zero weights included
    ap, auc = average_precision_and_auc(y, p, sample_weight=w)
    f1 = f1_at_thresholds(y, p, 0.4, sample_weight=w)
    for c in range(6):
        assert abs(ap[c] - average_precision_score(y[:, c], p[:, c], sample_weight=w)) < TOL
        assert abs(auc[c] - roc_auc_score(y[:, c], p[:, c], sample_weight=w)) < TOL
        assert abs(f1[c] - f1_score(y[:, c], p[:, c] >= 0.4, sample_weight=w)) < TOL


def test_all_tied_and_tiny_inputs():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.full((4, 2), 0.5)
    ap, auc = average_precision_and_auc(y, p)
    np.testing.assert_allclose(ap, [average_precision_score(y[:, c], p[:, c]) for c in range(2)], atol=TOL)
    np.testing.assert_allclose(auc, [0.5, 0.5], atol=TOL)
    ap, _ = average_precision_and_auc([[1]], [[0.3]])
    assert ap[0] == 1.0


def test_f1_equals_sklearn_at_default_and_given_thresholds():
    y, p = make_data(7, decimals=2)
    keep = y.sum(0) > 0
    f1 = f1_at_thresholds(y, p)
    np.testing.assert_allclose(f1[keep], sk_quiet(f1_score, y, (p >= 0.5).astype(int), average=None)[keep], atol=TOL)
    th = np.linspace(0.1, 0.9, 30)
    f1 = f1_at_thresholds(y, p, th)
    np.testing.assert_allclose(f1[keep], sk_quiet(f1_score, y, (p >= th).astype(int), average=None)[keep], atol=TOL)
    # probability exactly at the threshold counts as positive
    assert f1_at_thresholds([[1, 1]], [[0.5, 0.49]])[0] == 1.0
    assert f1_at_thresholds([[1, 1]], [[0.5, 0.49]])[1] == 0.0


def test_evaluate_macro_means_equal_sklearn():
    y, p = make_data(11, n=500, decimals=3)
    th = {c: t for c, t in zip(CLASSES, np.linspace(0.2, 0.8, 30))}
    ev = evaluate(pd.DataFrame(y, columns=CLASSES), pd.DataFrame(p, columns=CLASSES), thresholds=th)
    keep = y.sum(0) > 0
    both = keep & (y.sum(0) < len(y))
    expected_map = np.mean([average_precision_score(y[:, c], p[:, c]) for c in np.flatnonzero(keep)])
    assert abs(ev.summary['mAP'] - expected_map) < TOL
    assert abs(ev.summary['mAUC'] - roc_auc_score(y[:, both], p[:, both], average='macro')) < TOL
    pred = (p >= np.array(list(th.values()))).astype(int)
    assert abs(ev.summary['mF1'] - f1_score(y[:, keep], pred[:, keep], average='macro')) < TOL
    assert abs(ev.summary['ECE'] - ece_reference(y, p)) < TOL
    np.testing.assert_allclose(ev.per_class['threshold'], list(th.values()))
    assert list(ev.per_class.index) == CLASSES
    np.testing.assert_array_equal(ev.per_class['n_positive'], y.sum(0))


# ---------------------------------------------------------------- ECE against the hand loop

@pytest.mark.parametrize('seed', [0, 1])
def test_ece_equals_float64_loop(seed):
    y, p = make_data(seed, n=150, n_classes=8, prevalence=np.geomspace(0.5, 0.02, 8))
    assert abs(expected_calibration_error(y, p) - ece_reference(y, p)) < TOL
    assert abs(expected_calibration_error(y, p, n_bins=10) - ece_reference(y, p, 10)) < TOL
    per = per_class_ece(y, p)
    for c in range(8): assert abs(per[c] - ece_reference(y[:, c], p[:, c])) < TOL


def test_ece_bin_edges_and_known_values():
    # pairs exactly on the edges k/15 belong to the bin starting there; 1.0 to the last bin
    p = np.array([[k / 15 for k in range(16)]])
    y = np.zeros_like(p, dtype=int)
    assert abs(expected_calibration_error(y, p) - ece_reference(y, p)) < TOL
    r = reliability_table(y, p)
    assert r['count'].tolist() == [1] * 14 + [2]
    # perfectly calibrated by construction: in each bin the positive rate equals the (single) probability
    y = np.array([[1, 0, 0, 0, 1, 1, 1, 0]]).reshape(-1, 1)
    p = np.array([0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75]).reshape(-1, 1)
    assert expected_calibration_error(y, p, n_bins=2) == 0.0
    assert expected_calibration_error(np.ones((3, 2)), np.zeros((3, 2))) == 1.0


# ---------------------------------------------------------------- the no-positive policy

def test_class_without_positives_is_excluded_and_named():
    y, p = make_data(3, n=300)
    y[:, [19, 13]] = 0                       # pneumoperitoneo and azygos lobe absent from this split
    y[:, 0] = 1                              # Normal present on every image: AUC undefined, AP kept
    with warnings.catch_warnings():
        warnings.simplefilter('error')       # evaluate itself must not warn
        ev = evaluate(y, p)
    s = ev.summary
    assert s['excluded_classes'] == ['azygos lobe', 'pneumoperitoneo']
    assert s['auc_undefined_classes'] == ['Normal']
    assert s['n_classes_scored'] == 28
    assert ev.per_class.loc[['azygos lobe', 'pneumoperitoneo'], ['AP', 'AUC', 'F1']].isna().all().all()
    assert ev.per_class['excluded'].sum() == 2
    assert ev.per_class.loc['Normal', 'AP'] == 1.0 and np.isnan(ev.per_class.loc['Normal', 'AUC'])
    keep = [c for c in range(30) if c not in (13, 19)]
    expected = np.mean([average_precision_score(y[:, c], p[:, c]) for c in keep])
    assert abs(s['mAP'] - expected) < TOL
    # never counted as 0: scikit-learn's AP of 0 for the empty classes would lower the mean
    counted_as_zero = np.mean([sk_quiet(average_precision_score, y[:, c], p[:, c]) for c in range(30)])
    assert counted_as_zero < s['mAP'] - 0.01
    auc_keep = [c for c in keep if c != 0]
    assert abs(s['mAUC'] - np.mean([roc_auc_score(y[:, c], p[:, c]) for c in auc_keep])) < TOL
    # ECE still covers every class, including the excluded ones
    assert abs(s['ECE'] - ece_reference(y, p)) < TOL
    assert not np.isnan(ev.per_class.loc['pneumoperitoneo', 'ECE'])


def test_no_class_with_positives():
    ev = evaluate(np.zeros((5, 3), int), np.full((5, 3), 0.1))
    assert ev.summary['excluded_classes'] == ['class_0', 'class_1', 'class_2']
    assert np.isnan(ev.summary['mAP']) and np.isnan(ev.summary['mAUC']) and np.isnan(ev.summary['mF1'])
    assert abs(ev.summary['ECE'] - 0.1) < TOL


def test_group_means_use_class_groups_and_the_policy():
    y, p = make_data(4, n=600)
    train_counts = np.geomspace(30_000, 50, 30).astype(int)
    groups = class_groups(train_counts, n_images=143_000)
    y[:, 29] = 0                             # a tail class with no positive in this split
    ev = evaluate(y, p, groups=groups)
    assert (ev.per_class['group'] == groups.reindex(CLASSES)).all()
    ap = [average_precision_score(y[:, c], p[:, c]) if y[:, c].any() else np.nan for c in range(30)]
    for g in ['head', 'medium', 'tail']:
        idx = [c for c in range(30) if groups.iloc[c] == g and y[:, c].any()]
        assert ev.summary[f'{g}_n_classes_scored'] == len(idx)
        assert abs(ev.summary[f'{g}_mAP'] - np.mean([ap[c] for c in idx])) < TOL
    assert groups.iloc[29] == 'tail'
    with pytest.raises(ValueError, match=r"no entry for classes \['Normal'\]"):
        evaluate(y, p, groups=groups.drop('Normal'))


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_replicates_equal_sklearn_on_resampled_rows():
    y, p = make_data(8, n=200, n_classes=5, decimals=2, prevalence=[0.5, 0.3, 0.2, 0.1, 0.05])
    pid = np.random.default_rng(0).integers(0, 70, len(y))
    for patients in (None, pid):
        reps = bootstrap_replicates(y, p, thresholds=0.45, patient_ids=patients, n_bootstrap=4, seed=21)
        for i, cnt in enumerate(bootstrap_weights(len(y), patients, n_bootstrap=4, seed=21)):
            rows = np.repeat(np.arange(len(y)), cnt)
            yr, pr = y[rows], p[rows]
            keep = [c for c in range(5) if yr[:, c].any()]
            assert abs(reps.mAP[i] - np.mean([average_precision_score(yr[:, c], pr[:, c]) for c in keep])) < TOL
            assert abs(reps.mAUC[i] - np.mean([roc_auc_score(yr[:, c], pr[:, c]) for c in keep])) < TOL
            assert abs(reps.mF1[i] - f1_score(yr[:, keep], (pr[:, keep] >= 0.45).astype(int), average='macro')) < TOL
            assert abs(reps.ECE[i] - ece_reference(yr, pr)) < TOL
            assert reps.n_excluded[i] == 5 - len(keep)


def test_patient_resampling_keeps_patients_together():
    pid = np.array(['p1', 'p1', 'p2', 'p3', 'p3', 'p3', 'p4'])
    for cnt in bootstrap_weights(len(pid), pid, n_bootstrap=50, seed=2):
        for p_ in np.unique(pid): assert len(set(cnt[pid == p_])) == 1
        assert sum(cnt[np.flatnonzero(pid == p_)[0]] for p_ in np.unique(pid)) == 4
    a = [c.tolist() for c in bootstrap_weights(len(pid), pid, n_bootstrap=3, seed=2)]
    b = [c.tolist() for c in bootstrap_weights(len(pid), pid, n_bootstrap=3, seed=2)]
    assert a == b
    with pytest.raises(ValueError, match='6 entries for 7 samples'): next(bootstrap_weights(7, pid[:6]))


def test_patient_bootstrap_widens_interval_for_duplicated_images():
    y1, p1 = make_data(12, n=80, n_classes=4, prevalence=[0.4, 0.3, 0.3, 0.2])
    y5, p5, pid = np.repeat(y1, 5, 0), np.repeat(p1, 5, 0), np.repeat(np.arange(80), 5)
    img = bootstrap_ci(y5, p5, n_bootstrap=400, seed=1)
    pat = bootstrap_ci(y5, p5, patient_ids=pid, n_bootstrap=400, seed=1)
    width = lambda ci: ci.loc['mAP', 'high'] - ci.loc['mAP', 'low']
    assert width(pat) > 1.6 * width(img)
    assert pat.attrs['unit'] == 'patient' and img.attrs['unit'] == 'image'
    for ci in (img, pat):
        assert (ci['low'] <= ci['estimate']).all() and (ci['estimate'] <= ci['high']).all()
    expected_map = np.mean([average_precision_score(y1[:, c], p1[:, c]) for c in range(4)])
    assert abs(pat.loc['mAP', 'estimate'] - expected_map) < TOL


def test_evaluate_with_bootstrap_reports_intervals():
    y, p = make_data(13, n=300, n_classes=5, prevalence=[0.5, 0.3, 0.2, 0.1, 0.0])
    pid = np.arange(300) // 3
    ev = evaluate(y, p, patient_ids=pid, n_bootstrap=100, seed=4)
    s = ev.summary
    assert s['n_patients'] == 100 and s['bootstrap']['unit'] == 'patient' and s['bootstrap']['n_bootstrap'] == 100
    for m in ('mAP', 'mAUC', 'mF1', 'ECE'):
        lo, hi = s['ci'][m]
        assert lo <= s[m] <= hi, m
    direct = bootstrap_ci(y, p, patient_ids=pid, n_bootstrap=100, seed=4)
    assert s['ci']['mAP'] == [direct.loc['mAP', 'low'], direct.loc['mAP', 'high']]


def test_paired_bootstrap():
    y, good = make_data(14, n=500, n_classes=6, prevalence=np.geomspace(0.3, 0.03, 6))
    noise = np.random.default_rng(0).random(good.shape)
    r = paired_bootstrap(y, good, noise, n_bootstrap=300, seed=5)
    ap = lambda q: np.mean([average_precision_score(y[:, c], q[:, c]) for c in range(6)])
    assert abs(r['difference'] - (ap(good) - ap(noise))) < TOL and abs(r['a'] - ap(good)) < TOL
    assert r['a_beats_b'] and r['low'] > 0 and r['p_value'] < 0.01
    rev = paired_bootstrap(y, noise, good, n_bootstrap=300, seed=5)
    # the p-value is two-sided (under the null, by centring): the same either way round
    assert not rev['a_beats_b'] and rev['high'] < 0 and rev['p_value'] == r['p_value'] < 0.01
    assert abs(rev['low'] + r['high']) < TOL and abs(rev['high'] + r['low']) < TOL   # same resamples, sign flipped
    # a near-identical run does not "beat" the original
    jitter = np.clip(good + np.random.default_rng(1).normal(0, 1e-3, good.shape), 0, 1)
    assert not paired_bootstrap(y, jitter, good, n_bootstrap=200, seed=5)['a_beats_b']
    pid = np.arange(500) // 2
    rp = paired_bootstrap(y, good, noise, metric='mAUC', patient_ids=pid, n_bootstrap=100)
    assert rp['unit'] == 'patient' and rp['metric'] == 'mAUC'
    assert abs(rp['a'] - np.mean([roc_auc_score(y[:, c], good[:, c]) for c in range(6)])) < TOL


def test_paired_bootstrap_difference_per_replicate_equals_sklearn():
    y, a = make_data(15, n=150, n_classes=3, prevalence=[0.4, 0.3, 0.2])
    b = np.random.default_rng(3).random(a.shape)
    r = paired_bootstrap(y, a, b, n_bootstrap=5, seed=9, level=0.5)
    diffs = []
    for cnt in bootstrap_weights(len(y), None, 5, 9):
        rows = np.repeat(np.arange(len(y)), cnt)
        diffs.append(np.mean([average_precision_score(y[rows, c], a[rows, c])
                              - average_precision_score(y[rows, c], b[rows, c]) for c in range(3)]))
    assert abs(r['low'] - np.quantile(diffs, 0.25)) < TOL and abs(r['high'] - np.quantile(diffs, 0.75)) < TOL


def explicit_resamples(n, patient_ids, n_bootstrap, seed):
    "Rows of each replicate drawn by hand with numpy's default_rng: patients (in order of first appearance) or images."
    rng = np.random.default_rng(seed)
    if patient_ids is None:
        for _ in range(n_bootstrap): yield rng.integers(0, n, n)
        return
    pid = np.asarray(patient_ids)
    rows_of = [np.flatnonzero(pid == q) for q in dict.fromkeys(pid.tolist())]
    for _ in range(n_bootstrap):
        yield np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])


def macro_ap(y, p, classes):
    "Macro AP with scikit-learn (float64) over the given classes."
    return np.mean([average_precision_score(y[:, c], p.astype(np.float64)[:, c]) for c in classes])


def one_patient_class_data(seed, n_patients=120, prevalence=(0.3, 0.2, 0.1)):
    "Two images per patient; the last class's positives are the two images of patient 7 only."
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), 2)
    y = np.c_[(rng.random((len(pid), len(prevalence))) < prevalence).astype(int), pid == 7]
    return y, pid, rng


def test_paired_bootstrap_p_value_under_the_null_equals_explicit_loop():
    y, pid, rng = one_patient_class_data(seed=29)
    C = y.shape[1]
    pa, pb = (np.clip(0.25 * y + 0.75 * rng.random(y.shape), 0, 1) for _ in range(2))   # runs of the same quality
    B, seed = 150, 3
    r = paired_bootstrap(y, pa, pb, patient_ids=pid, n_bootstrap=B, seed=seed)
    d_hat = macro_ap(y, pa, range(C)) - macro_ap(y, pb, range(C))
    ref, lost = [], []
    for rows in explicit_resamples(len(y), pid, B, seed):
        keep = [c for c in range(C) if y[rows, c].any()]   # the same classes in both runs' means
        ref.append(macro_ap(y[rows], pa[rows], keep) - macro_ap(y[rows], pb[rows], keep))
        lost.append(len(keep) < C)
    ref, lost = np.array(ref), np.array(lost)
    assert abs(r['difference'] - d_hat) < TOL
    p_ref = (1 + np.sum(np.abs(ref - d_hat) >= abs(d_hat))) / (1 + B)
    assert r['p_value'] == p_ref and 0.02 < p_ref < 0.9
    # replicates on both sides lie at least |d| from d: the two-sided count, not P(d* <= 0), decides the value
    assert np.sum(ref - d_hat >= abs(d_hat)) > 0 and np.sum(ref - d_hat <= -abs(d_hat)) > 0
    assert paired_bootstrap(y, pb, pa, patient_ids=pid, n_bootstrap=B, seed=seed)['p_value'] == p_ref
    assert r['p_value_method'].startswith('two-sided, under the null')
    np.testing.assert_allclose(r['replicate_differences'], ref, rtol=0, atol=1e-12)
    assert abs(r['low'] - np.quantile(ref, 0.025)) < TOL and abs(r['high'] - np.quantile(ref, 0.975)) < TOL
    assert r['n_replicates_losing_a_class'] == lost.sum() > 0
    assert r['replicates_lost_by_class'] == {'class_3': lost.sum()} and r['n_replicates_used'] == B
    # 'drop': the same replicates less those that lost class_3
    rd = paired_bootstrap(y, pa, pb, patient_ids=pid, n_bootstrap=B, seed=seed, lost_classes='drop')
    np.testing.assert_allclose(rd['replicate_differences'], ref[~lost], rtol=0, atol=1e-12)
    assert rd['n_replicates_used'] == (~lost).sum() and rd['difference'] == r['difference']
    assert abs(rd['low'] - np.quantile(ref[~lost], 0.025)) < TOL
    assert rd['p_value'] == (1 + np.sum(np.abs(ref[~lost] - d_hat) >= abs(d_hat))) / (1 + (~lost).sum())


def test_paired_bootstrap_identical_runs_give_p_1():
    y, p = make_data(21, n=200, n_classes=5, prevalence=[0.4, 0.3, 0.2, 0.1, 0.05])
    for patients in (None, np.arange(200) // 4):
        r = paired_bootstrap(y, p, p.copy(), patient_ids=patients, n_bootstrap=100, seed=1)
        assert r['difference'] == 0 and r['low'] == r['high'] == 0 and r['p_value'] == 1.0 and not r['a_beats_b']


def test_paired_bootstrap_strongly_better_run_gives_smallest_p():
    y, good = make_data(22, n=400, n_classes=5, prevalence=[0.4, 0.3, 0.2, 0.1, 0.05])
    noise = np.random.default_rng(2).random(good.shape)
    for metric in ('mAP', 'mAUC'):
        r = paired_bootstrap(y, good, noise, metric=metric, n_bootstrap=250, seed=4)
        assert r['p_value'] == 1 / 251 and r['a_beats_b']


def test_paired_bootstrap_p_values_under_a_simulated_null_are_not_concentrated_near_0():
    p_values = []
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        y = (rng.random((200, 4)) < [0.4, 0.3, 0.2, 0.15]).astype(int)
        same_quality = [np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1) for _ in range(2)]  # independent noise
        p_values.append(paired_bootstrap(y, *same_quality, n_bootstrap=200, seed=seed)['p_value'])
    p_values = np.array(p_values)
    assert np.mean(p_values < 0.05) < 0.15, np.sort(p_values)
    assert 0.25 < np.median(p_values) < 0.75, np.sort(p_values)   # spread over (0, 1), as a p-value under the null


def test_paired_bootstrap_ece_equals_explicit_resampling():
    rng = np.random.default_rng(23)
    calibrated = rng.random((300, 4)) * 0.6
    y = (rng.random((300, 4)) < calibrated).astype(int)
    too_low = calibrated ** 2
    pid = np.arange(300) // 3
    r = paired_bootstrap(y, calibrated, too_low, metric='ECE', patient_ids=pid, n_bootstrap=60, seed=2, n_bins=10)
    ece = lambda yy, pp: expected_calibration_error(yy, pp, n_bins=10)
    assert abs(r['difference'] - (ece(y, calibrated) - ece(y, too_low))) < TOL and abs(r['b'] - ece(y, too_low)) < TOL
    ref = [ece(y[rows], calibrated[rows]) - ece(y[rows], too_low[rows])
           for rows in explicit_resamples(300, pid, 60, 2)]
    np.testing.assert_allclose(r['replicate_differences'], ref, rtol=0, atol=1e-12)
    # lower is better: a negative difference means A is better calibrated, and A beats B
    assert r['difference'] < 0 and r['high'] < 0 and r['a_beats_b'] and r['higher_is_better'] is False
    rev = paired_bootstrap(y, too_low, calibrated, metric='ECE', patient_ids=pid, n_bootstrap=60, seed=2, n_bins=10)
    assert rev['low'] > 0 and not rev['a_beats_b'] and rev['p_value'] == r['p_value'] == 1 / 61
    with pytest.raises(ValueError, match="metric must be 'mAP', 'mAUC', 'mF1' or 'ECE', got 'AP'"):
        paired_bootstrap(y, calibrated, too_low, metric='AP')


def test_lost_classes_counted_named_and_dropped(tmp_path):
    y, p = make_data(30, n=300, prevalence=np.r_[np.geomspace(0.4, 0.05, 29), 0])   # 30 columns: CLASSES
    pid = np.arange(300) // 3
    y[pid == 42, 29] = 1                                  # the last class: the three images of patient 42 only
    B, seed = 100, 6
    lost, maps = [], []
    for rows in explicit_resamples(300, pid, B, seed):    # the explicit count over the same resamples
        lost.append(y.any(0) & ~y[rows].any(0))
        maps.append(macro_ap(y[rows], p[rows], np.flatnonzero(y[rows].any(0))))
    lost, maps = np.array(lost), np.array(maps)
    by_class = {CLASSES[c]: int(k) for c, k in enumerate(lost.sum(0)) if k}
    kept = ~lost.any(1)
    assert CLASSES[29] in by_class and 0.5 * B < kept.sum() < B
    ci = bootstrap_ci(y, p, patient_ids=pid, n_bootstrap=B, seed=seed)
    assert ci.attrs['replicates_lost_by_class'] == by_class and ci.attrs['lost_classes'] == 'exclude'
    assert ci.attrs['n_replicates_losing_a_class'] == ci.attrs['replicates_excluding_more_classes'] == (~kept).sum()
    assert ci.attrs['n_replicates_used'] == B and abs(ci.loc['mAP', 'low'] - np.quantile(maps, 0.025)) < TOL
    drop = bootstrap_ci(y, p, patient_ids=pid, n_bootstrap=B, seed=seed, lost_classes='drop')
    assert drop.attrs['replicates_lost_by_class'] == by_class and drop.attrs['n_replicates_used'] == kept.sum()
    assert abs(drop.loc['mAP', 'low'] - np.quantile(maps[kept], 0.025)) < TOL
    assert abs(drop.loc['mAP', 'high'] - np.quantile(maps[kept], 0.975)) < TOL
    assert drop.loc['mAP', 'low'] != ci.loc['mAP', 'low'] and drop.loc['mAP', 'estimate'] == ci.loc['mAP', 'estimate']
    reps = bootstrap_replicates(y, p, patient_ids=pid, n_bootstrap=B, seed=seed, lost_classes='drop')
    assert reps.index.tolist() == np.flatnonzero(kept).tolist()
    np.testing.assert_allclose(reps.mAP, maps[kept], rtol=0, atol=TOL)
    ev = evaluate(y, p, patient_ids=pid, n_bootstrap=B, seed=seed, lost_classes='drop')
    assert ev.summary['bootstrap']['replicates_lost_by_class'] == by_class
    assert ev.summary['ci']['mAP'] == [drop.loc['mAP', 'low'], drop.loc['mAP', 'high']]
    saved = json.loads((ev.save(tmp_path) / 'metrics.json').read_text())
    assert saved['bootstrap']['replicates_lost_by_class'] == by_class
    # evaluate names the classes as it was told to
    named = evaluate(y[:, 27:], p[:, 27:], classes=['a', 'b', 'c'], patient_ids=pid, n_bootstrap=B, seed=seed)
    assert named.summary['bootstrap']['replicates_lost_by_class'] == {'c': by_class[CLASSES[29]]}


def test_drop_refuses_when_fewer_than_half_the_replicates_survive():
    pid = np.repeat(np.arange(40), 2)
    y = np.zeros((80, 3), int)
    for c in range(3): y[pid == c + 1, c] = 1             # each class in one patient of 40
    p = np.random.default_rng(0).random(y.shape)
    survivors = sum(bool(y[rows].any(0).all()) for rows in explicit_resamples(80, pid, 100, 0))
    assert survivors < 50
    msg = rf"lost_classes='drop' keeps only {survivors} of 100 replicates \(fewer than half\)"
    with pytest.raises(ValueError, match=msg):
        bootstrap_ci(y, p, patient_ids=pid, n_bootstrap=100, lost_classes='drop')
    with pytest.raises(ValueError, match=msg):
        paired_bootstrap(y, p, p ** 2, patient_ids=pid, n_bootstrap=100, lost_classes='drop')
    assert bootstrap_ci(y, p, patient_ids=pid, n_bootstrap=100).attrs['n_replicates_used'] == 100
    for f in (bootstrap_ci, bootstrap_replicates, evaluate):
        with pytest.raises(ValueError, match="lost_classes must be 'exclude' or 'drop', got 'ignore'"):
            f(y, p, lost_classes='ignore')


# ---------------------------------------------------------------- input checks, saving, plotting

def test_bad_input_is_named():
    with pytest.raises(ValueError, match="row 1, class 'cardiomegaly' holds 0.5"):
        check_predictions(np.array([[0] * 30, [0, 0, 0.5] + [0] * 27]), np.zeros((2, 30)))
    with pytest.raises(ValueError, match='look like logits'):
        evaluate([[0, 1]], [[-2.0, 3.0]])
    with pytest.raises(ValueError, match='columns differ'):
        evaluate(pd.DataFrame([[0, 1]], columns=['a', 'b']), pd.DataFrame([[0.1, 0.2]], columns=['b', 'a']))
    with pytest.raises(ValueError, match=r"thresholds by class: missing \['Mass'\]"):
        evaluate([[0, 1]], [[0.1, 0.2]], thresholds={'Hernia': 0.5}, classes=['Hernia', 'Mass'])
    with pytest.raises(ValueError, match='patient_ids row 1 is missing'):
        evaluate([[0], [1]], [[0.1], [0.2]], patient_ids=['a', None])
    with pytest.raises(ValueError, match='n_bins must be a positive integer'):
        expected_calibration_error([[0]], [[0.1]], n_bins=0)
    with pytest.raises(ValueError, match='0 rows'):
        evaluate(np.zeros((0, 3)), np.zeros((0, 3)))


def test_evaluation_save(tmp_path):
    y, p = make_data(16, n=100, prevalence=np.full(30, 0.3))
    y[:, 5] = 0
    ev = evaluate(y, p, groups=class_groups(np.geomspace(30_000, 50, 30).astype(int), n_images=143_000))
    assert isinstance(ev, Evaluation)
    out = ev.save(tmp_path / 'val', params={'run': 'bce_resnet50', 'split': 'val'})
    m = json.loads((out / 'metrics.json').read_text())
    assert m['params'] == {'run': 'bce_resnet50', 'split': 'val'} and m['excluded_classes'] == ['atelectasis']
    assert abs(m['mAP'] - ev.summary['mAP']) < 1e-15
    table = pd.read_csv(out / 'per_class.csv', index_col='class')
    assert list(table.index) == CLASSES and {'group', 'AP', 'AUC', 'F1', 'ECE', 'excluded'} <= set(table.columns)
    assert not list(tmp_path.glob('val/.*.tmp'))


def test_plot_reliability(tmp_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    y, p = make_data(17, n=300)
    ax = plot_reliability(y, {'uncalibrated': p, 'sharpened': p ** 2}, title='val')
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1] == f'uncalibrated (ECE {expected_calibration_error(y, p):.4f})'
    assert len(ax.figure.axes) == 2 and ax.get_title() == 'val'
    r = reliability_table(y, p)
    seen = r['count'] > 0
    np.testing.assert_allclose(ax.lines[1].get_xdata(), r.mean_prob[seen])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), r.positive_rate[seen])
    ax.figure.savefig(tmp_path / 'reliability.png')
    assert (tmp_path / 'reliability.png').stat().st_size > 1000
    plt.close('all')


# ---------------------------------------------------------------- size: 143K x 30 (timing printed, not asserted)

def test_challenge_sized_split_timing(capsys):
    rng = np.random.default_rng(0)
    n = 143_000
    y = (rng.random((n, 30)) < np.geomspace(0.3, 0.0005, 30)).astype(np.int8)
    p = np.clip(0.2 * y + 0.8 * rng.random((n, 30)), 0, 1).astype(np.float32)   # float32 scores, as a network gives
    t0 = time.perf_counter(); ev = evaluate(y, p); t_eval = time.perf_counter() - t0
    t0 = time.perf_counter(); reps = bootstrap_replicates(y, p, n_bootstrap=5); t_boot = time.perf_counter() - t0
    for c in (0, 15, 29):
        assert abs(ev.per_class.AP.iloc[c] - average_precision_score(y[:, c], p[:, c])) < TOL
        assert abs(ev.per_class.AUC.iloc[c] - roc_auc_score(y[:, c], p[:, c])) < TOL
    t0 = time.perf_counter()
    sk_ap = [average_precision_score(y[:, c], p[:, c]) for c in range(30)]
    sk_auc = [roc_auc_score(y[:, c], p[:, c]) for c in range(30)]
    t_sk = time.perf_counter() - t0
    np.testing.assert_allclose(ev.per_class.AP, sk_ap, atol=TOL)
    np.testing.assert_allclose(ev.per_class.AUC, sk_auc, atol=TOL)
    assert len(reps) == 5
    with capsys.disabled():
        print(f'\n143,000 x 30: evaluate {t_eval:.2f} s (AP, AUC, F1, ECE, per-class ECE); '
              f'scikit-learn AP+AUC loop {t_sk:.2f} s; bootstrap 5 replicates {t_boot:.2f} s (incl. one-off ranking)')
