"""mAP per projection (view) against scikit-learn on each view's images, its patient-bootstrap interval, rare views
pooled as 'other', and the per-view rows of results.csv from a scored predictions file."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from cxrlt.labels import CLASSES
from cxrlt.metrics import bootstrap_ci, bootstrap_replicates, bootstrap_weights, evaluate

TOL = 1e-12


def sk_map(y, p):
    "Macro AP by scikit-learn in float64 over the classes with a positive in `y`, and the classes without one."
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    has = y.any(0)
    return np.mean([average_precision_score(y[:, c], p[:, c]) for c in np.flatnonzero(has)]), np.flatnonzero(~has)


def patients_with_views(seed, n_patients=90, n_classes=8):
    """Each patient: a PA and a lateral image (one study: the same labels), the lateral's scores noisier; then 28
    patients with one bedside image (18 'AP horizontal', 10 'AP') and 4 with a costal view."""
    rng = np.random.default_rng(seed)
    prev = np.geomspace(0.35, 0.02, n_classes)
    y_pat = (rng.random((n_patients, n_classes)) < prev).astype(int)
    y = np.repeat(y_pat, 2, 0)
    views = np.array(['PA', 'lateral'] * n_patients, dtype=object)
    pid = np.repeat(np.arange(n_patients), 2)
    extra = ['AP horizontal'] * 18 + ['AP'] * 10 + ['COSTAL'] * 4
    y = np.vstack([y, (rng.random((len(extra), n_classes)) < prev * 2).astype(int)])
    views = np.r_[views, extra]
    pid = np.r_[pid, n_patients + np.arange(len(extra))]
    signal = np.where(views == 'lateral', 0.1, 0.35)[:, None]
    p = np.clip(signal * y + (1 - signal) * rng.random(y.shape), 0, 1)
    return y, p, views, pid


def test_view_map_equals_sklearn_on_each_views_images():
    y, p, views, pid = patients_with_views(0)
    ev = evaluate(y, p, patient_ids=pid, views=views)
    v = ev.summary['views']
    assert list(v) == ['PA', 'lateral', 'other']
    for name, members in (('PA', ['PA']), ('lateral', ['lateral']), ('other', ['AP horizontal', 'AP', 'COSTAL'])):
        m = np.isin(views, members)
        ref, missing = sk_map(y[m], p[m])
        assert abs(v[name]['mAP'] - ref) < TOL, name
        assert v[name]['excluded_classes'] == [f'class_{c}' for c in missing]
        assert v[name]['n_classes_scored'] == y.shape[1] - len(missing)
        assert (v[name]['n_images'], v[name]['n_patients']) == (m.sum(), len(np.unique(pid[m])))
    assert v['lateral']['mAP'] < v['PA']['mAP']   # the noisier view scores lower
    # the overall metrics are untouched by views
    plain = evaluate(y, p, patient_ids=pid)
    assert all(ev.summary[k] == plain.summary[k] for k in plain.summary)


def test_view_interval_contains_the_estimate_and_resamples_patients():
    y, p, views, pid = patients_with_views(1)
    ev = evaluate(y, p, patient_ids=pid, views=views, n_bootstrap=200, seed=2)
    for name, e in ev.summary['views'].items():
        lo, hi = ev.summary['ci'][f'mAP[{name}]']
        assert lo <= e['mAP'] <= hi and hi - lo > 0.01, name
    # every replicate equals scikit-learn on the rows a patient draw gives: a patient's images of both views are
    # drawn together, as often as the patient, and the view's mAP is taken over its drawn images
    reps = bootstrap_replicates(y, p, patient_ids=pid, n_bootstrap=30, seed=5, views=views)
    pa = views == 'PA'
    for i, cnt in enumerate(bootstrap_weights(len(y), pid, n_bootstrap=30, seed=5)):
        assert (cnt[0:180:2] == cnt[1:180:2]).all()   # PA and lateral of one patient
        for name, m in (('PA', pa), ('lateral', views == 'lateral')):
            rows = np.repeat(np.arange(len(y)), cnt * m)
            assert abs(reps[f'mAP[{name}]'][i] - sk_map(y[rows], p[rows])[0]) < TOL, (i, name)
    # a patient with three copies of its PA image: drawing patients widens the PA interval (by about √3) where
    # drawing images would treat the copies as independent
    y3, p3, v3, pid3 = (np.repeat(a[pa], 3, 0) for a in (y, p, views, pid))
    y3, p3 = np.vstack([y3, y[~pa]]), np.vstack([p3, p[~pa]])
    v3, pid3 = np.r_[v3, views[~pa]], np.r_[pid3, pid[~pa]]
    width = lambda ci: ci.loc['mAP[PA]', 'high'] - ci.loc['mAP[PA]', 'low']
    by_patient = width(bootstrap_ci(y3, p3, patient_ids=pid3, views=v3, n_bootstrap=300, seed=0))
    by_image = width(bootstrap_ci(y3, p3, views=v3, n_bootstrap=300, seed=0))
    assert by_patient > 1.4 * by_image, (by_patient, by_image)


def test_rare_views_are_pooled_as_other_or_left_unscored():
    y, p, views, pid = patients_with_views(2)
    # without 3 costal images 'other' (29 images) falls under the minimum of 30: counted, named, not scored, no interval
    ev = evaluate(y[:-3], p[:-3], patient_ids=pid[:-3], views=views[:-3], n_bootstrap=20, min_view_images=30)
    other = ev.summary['views']['other']
    assert other == {'n_images': 29, 'scored': False, 'pooled': {'AP horizontal': 18, 'AP': 10, 'COSTAL': 1},
                     'n_patients': 29}
    assert 'mAP[other]' not in ev.summary['ci'] and {'mAP[PA]', 'mAP[lateral]'} <= set(ev.summary['ci'])
    assert ev.summary['min_view_images'] == 30 and "pooled as 'other'" in ev.summary['view_policy']
    # with a minimum of 12, AP horizontal stands alone and AP with COSTAL makes 'other' (14 images)
    ev = evaluate(y, p, views=views, min_view_images=12)
    assert {k: e['scored'] for k, e in ev.summary['views'].items()} == \
        {'PA': True, 'lateral': True, 'AP horizontal': True, 'other': True}
    m = np.isin(views, ['AP', 'COSTAL'])
    assert ev.summary['views']['other']['pooled'] == {'AP': 10, 'COSTAL': 4}
    assert abs(ev.summary['views']['other']['mAP'] - sk_map(y[m], p[m])[0]) < TOL
    # no view reaches the minimum: 'other' would be every image, the overall mAP again, so nothing is scored
    ev = evaluate(y, p, views=views, min_view_images=500, n_bootstrap=5)
    assert ev.summary['views'] == {'other': {'n_images': len(y), 'scored': False, 'pooled': {
        'PA': 90, 'lateral': 90, 'AP horizontal': 18, 'AP': 10, 'COSTAL': 4}}}
    assert list(ev.summary['ci']) == ['mAP', 'mAUC', 'mF1', 'ECE']
    # the minimum itself is enough: 30 PA images stand alone, 29 lateral ones (alone in 'other') are too few
    ev = evaluate(y[:59], p[:59], views=np.array(['PA'] * 30 + ['lateral'] * 29))
    assert {k: (e['n_images'], e['scored']) for k, e in ev.summary['views'].items()} == \
        {'PA': (30, True), 'other': (29, False)}
    with pytest.raises(ValueError, match="views row 3 is missing"):
        evaluate(y, p, views=np.where(np.arange(len(y)) == 3, None, views))
    with pytest.raises(ValueError, match="'other' is the name of the pooled rare views"):
        evaluate(y, p, views=np.where(views == 'COSTAL', 'other', views))


@pytest.fixture(scope='module')
def padchest_sample(tmp_path_factory):
    """A training CSV of real PadChest images (true patients and projections from the torchxrayvision master CSV,
    random labels made here and never saved beside the repository): 70 studies with a PA and a lateral, 40 AP
    horizontal, 12 AP and 2 costal images; the first 20 PA/lateral patients train, every other image is on dev."""
    from cxrlt.data import read_padchest_master
    m = read_padchest_master()
    m = m[m.PatientID.notna()].drop_duplicates('ImageID')
    pl = m[m.Projection.isin(['PA', 'L'])]
    per_study = pl.groupby('StudyID').agg(views=('Projection', 'nunique'), images=('Projection', 'size'),
                                           patients=('PatientID', 'nunique'))
    pairs = pl[pl.StudyID.isin(per_study.index[(per_study.views == 2) & (per_study.images == 2) &
                                               (per_study.patients == 1)])]
    studies = pairs.drop_duplicates('PatientID').StudyID.iloc[:70]
    chosen = [pairs[pairs.StudyID.isin(studies)].sort_values(['StudyID', 'Projection'])]
    used = set(chosen[0].PatientID)
    for proj, n in (('AP_horizontal', 40), ('AP', 12), ('COSTAL', 2)):
        one = m[(m.Projection == proj) & ~m.PatientID.isin(used)].drop_duplicates('PatientID').iloc[:n]
        used |= set(one.PatientID)
        chosen.append(one)
    df = pd.concat(chosen, ignore_index=True)
    rng = np.random.default_rng(0)
    y = (rng.random((len(df), len(CLASSES))) < np.geomspace(0.4, 0.03, len(CLASSES))).astype(int)
    folder = tmp_path_factory.mktemp('views')
    train = pd.concat([df[['ImageID', 'StudyDate_DICOM', 'PatientID']].astype(str), pd.DataFrame(y, columns=CLASSES)],
                      axis=1)
    train.to_csv(folder/'train.csv', index=False)
    train_patients = set(chosen[0].PatientID.drop_duplicates().iloc[:20])
    split = np.where(df.PatientID.isin(train_patients), 'train', 'dev')
    pd.DataFrame({'ImageID': df.ImageID, 'split': split}).to_csv(folder/'split.csv', index=False)
    view = df.Projection.map({'PA': 'PA', 'L': 'lateral', 'AP_horizontal': 'AP horizontal'}).fillna(df.Projection)
    return folder, df.assign(view=view.to_numpy(), split=split), y


def test_results_csv_has_a_row_per_view_of_a_scored_predictions_file(padchest_sample):
    from cxrlt.study import collect_results, score_predictions
    folder, df, y = padchest_sample
    dev = df.split == 'dev'
    rng = np.random.default_rng(1)
    probs = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
    pred = pd.concat([pd.DataFrame({'ImageID': df.ImageID[dev], 'split': 'dev'}),
                      pd.DataFrame(probs[dev], columns=CLASSES, index=df.index[dev])], axis=1)
    pred.to_csv(folder/'predictions.csv', index=False)
    row = folder/'table'/'rows'/'row03'
    metrics = score_predictions(folder/'predictions.csv', {'train_csv': str(folder/'train.csv'),
                                                           'split_file': str(folder/'split.csv')}, row, n_bootstrap=40)
    (row/'result.json').write_text(json.dumps({'row': 3, 'preset': 'smoke', 'metrics': metrics}))
    res = collect_results(folder/'table')
    assert pd.read_csv(folder/'table'/'results.csv').metric.tolist() == res.metric.tolist()
    views = res[res.metric.str.startswith('AP[')].set_index('metric')
    # PA and lateral (50 dev images each) and AP horizontal (40) stand alone; AP and costal (14) are too few alone
    # and together: counted in dev/metrics.json, absent from results.csv
    assert list(views.index) == ['AP[PA]', 'AP[lateral]', 'AP[AP horizontal]']
    assert (views.split == 'dev').all() and (views.row == 3).all()
    yd, pd_, vd = y[dev], probs[dev], df.view[dev].to_numpy()
    for name in ('PA', 'lateral', 'AP horizontal'):
        r, m = views.loc[f'AP[{name}]'], vd == name
        assert r.n_images == m.sum() and abs(r.value - sk_map(yd[m], pd_[m])[0]) < 1e-12, name
        assert r.ci_low <= r.value <= r.ci_high
    saved = json.loads((row/'dev'/'metrics.json').read_text())
    assert saved['views']['other'] == {'n_images': 14, 'scored': False, 'pooled': {'AP': 12, 'COSTAL': 2},
                                       'n_patients': 14}
    overall = res[res.metric == 'AP'].iloc[0]
    assert overall.n_images == dev.sum() and abs(overall.value - sk_map(yd, pd_)[0]) < 1e-12
