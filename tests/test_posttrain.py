"""Post-training on a real (tiny) run: feature cache, cRT, TTA, calibration, thresholds, ensembles, and every refusal
of `cxrlt submit`."""
import json, shutil, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

import cxrlt.cli
import cxrlt.models
import cxrlt.posttrain as pt
import cxrlt.posttrain.retrain
import cxrlt.posttrain.submit
import cxrlt.run
import cxrlt.train
from conftest import quiet_fit, tiny_challenge
from cxrlt.core import load_checkpoint
from cxrlt.labels import CLASSES
from cxrlt.posttrain.predictions import _row_keys
from cxrlt.run import Run

torch.set_num_threads(1)   # small tensors on a shared CPU: one thread is much faster


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return tiny_challenge(tmp_path_factory.mktemp('posttrain'), n_train=80, n_test=24)


@pytest.fixture(scope='module')
def run(tiny):
    from cxrlt.datasets import AugmentConfig
    cfg = cxrlt.train.TrainConfig(train_csv=tiny/'train.csv', train_cache=tiny/'cache', test_csv=tiny/'test.csv',
                                  test_cache=tiny/'cache', test_labels_csv=tiny/'test_labels.csv', out_dir=tiny/'runs',
                                  backbone='resnet10t', epochs=2, batch_size=16, lr=3e-3, progress=False,
                                  deterministic=True, val_fraction=0.25,
                                  augment=AugmentConfig(degrees=0, translate=0, scale=(1, 1)))
    return quiet_fit(cfg)


# --- feature cache and cRT -------------------------------------------------------------------------------------

def test_feature_cache_matches_the_backbone_and_is_built_once(run, monkeypatch):
    folder = pt.feature_cache(run, progress=False, train_views=0)   # un-augmented (augmented views: tests/test_crt.py)
    assert sorted(p.name for p in folder.iterdir()) == ['dev.npy', 'dev_labels.npy', 'features.json', 'index.csv',
                                                        'test.npy', 'test_labels.npy', 'train.npy', 'train_labels.npy',
                                                        'val.npy', 'val_labels.npy']
    assert not (run/'features.partial').exists()
    meta = json.loads((folder/'features.json').read_text())
    assert meta['status'] == 'complete' and meta['fingerprint']['sha256'] == pt.file_sha256(run/'best.pt')
    # the cached features are the best model's pooled features, image by image, in the dataset's order
    model, data = Run(run).best_model(), Run(run).datasets()
    for split in ('train', 'val', 'dev', 'test'):
        f = pt.load_features(run, split)
        assert f['image_ids'] == data[split]['table'].ImageID.tolist()
        np.testing.assert_array_equal(f['labels'], data[split]['labels'])
        for i in (0, len(f['image_ids']) - 1):
            x = data[split]['dataset'][i][0]
            with torch.no_grad(): ref = cxrlt.models.forward_features(model, x[None]).numpy()[0]
            np.testing.assert_allclose(f['features'][i], ref, atol=1e-5)
    # a second call finds the cache and does not run the model (feature_cache looks extract_features up in its module)
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features',
                        lambda *a, **k: pytest.fail('the backbone ran again'))
    assert pt.feature_cache(run, progress=False, train_views=0) == folder


def test_feature_cache_resumes_and_follows_the_checkpoint(run, tmp_path, monkeypatch):
    copy = tmp_path/run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns('features', 'posttrain'))
    real, calls = pt.extract_features, []
    def interrupted(model, dataset, *a, desc='', **k):
        calls.append(desc)
        if desc == 'features val': raise KeyboardInterrupt
        return real(model, dataset, *a, desc=desc, **k)
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features', interrupted)
    with pytest.raises(KeyboardInterrupt): pt.feature_cache(copy, progress=False, train_views=0)
    assert not (copy/'features').exists() and (copy/'features.partial'/'train.npy').exists()
    with pytest.raises(FileNotFoundError, match='has no feature cache'): pt.load_features(copy, 'train')
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features',
                        lambda m, d, *a, desc='', **k: calls.append(desc) or real(m, d, *a, desc=desc, **k))
    pt.feature_cache(copy, progress=False, train_views=0)
    assert calls == ['features train', 'features val', 'features val', 'features dev',
                     'features test']   # train was not computed again
    # a new best.pt makes the cache stale: loading refuses it, building replaces it
    ck = torch.load(copy/'best.pt', weights_only=True)
    ck['epoch'] += 100
    torch.save(ck, copy/'best.pt')
    with pytest.raises(RuntimeError, match='computed from another best.pt'): pt.load_features(copy, 'val')
    pt.feature_cache(copy, progress=False, train_views=0)
    assert pt.load_features(copy, 'val')['features'].shape[0] == len(pt.load_features(run, 'val')['image_ids'])
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith('features')) == ['features']


def test_crt_never_runs_the_backbone_and_its_model_agrees(run, monkeypatch):
    pt.feature_cache(run, progress=False)
    def no_backbone(*a, **k): raise AssertionError('cRT ran the backbone')
    monkeypatch.setattr(cxrlt.models, 'forward_features', no_backbone)
    monkeypatch.setattr(cxrlt.run.Run, 'best_model', no_backbone)
    monkeypatch.setattr(cxrlt.run.Run, 'datasets', no_backbone)
    r = pt.crt(run, epochs=4, progress=False)
    monkeypatch.undo()
    out = pt.read_predictions(r['out'])
    runs = pt.read_predictions(run/'predictions.csv')
    assert list(out.columns) == list(runs.columns)
    assert sorted(_row_keys(out)) == sorted(_row_keys(runs))
    assert set(r) >= {'val', 'test', 'history'} and len(r['history']) == 4
    # the re-trained classifier on the backbone gives the logits cRT computed from the cached features
    model = pt.load_crt_model(run, r['classifier'])
    data = Run(run).datasets()
    x = torch.stack([data['test']['dataset'][i][0] for i in range(3)])
    with torch.no_grad(): z = model(x).double().numpy()
    test = out[out.split == 'test'].set_index('ImageID')
    rows = test.loc[data['test']['table'].ImageID[:3], pt.LOGIT_COLUMNS].to_numpy()
    np.testing.assert_allclose(z, rows, atol=1e-4)


def test_crt_builds_count_and_image_based_losses_and_ldams_scale(run):
    "Losses that need the counts and the number of training images get both, as in `fit`: no loss_kwargs needed."
    for loss in ('logit_adjusted_bce', 'negative_tolerant_bce'):
        r = pt.crt(run, loss=loss, epochs=1, progress=False, out=run/'posttrain'/f'crt-{loss}.csv')
        params = json.loads(Path(r['out']).with_suffix('.json').read_text())['params']
        assert (params['loss'], params['loss_kwargs']) == (loss, {})
        assert load_checkpoint(r['classifier'])['log_odds_scale'] == 1.0
    # a cosine head with LDAM: outputs are cosines, log-odds are s = 30 times them (the loss's logit_scale)
    r = pt.crt(run, head='normed', loss='ldam', epochs=1, progress=False, out=run/'posttrain'/'crt-ldam.csv')
    assert load_checkpoint(r['classifier'])['log_odds_scale'] == 30.0
    model, data = pt.load_crt_model(run, r['classifier']), Run(run).datasets()
    x = torch.stack([data['val']['dataset'][i][0] for i in range(2)])
    with torch.no_grad(): cosines = model(x).double().numpy()
    assert np.abs(cosines).max() <= 1 + 1e-6
    f = pt.read_predictions(r['out'])
    rows = f[f.split == 'val'].set_index('ImageID').loc[data['val']['table'].ImageID[:2], pt.LOGIT_COLUMNS]
    np.testing.assert_allclose(rows.to_numpy(), 30 * cosines, atol=1e-3)


def test_crt_tta_averages_the_flip_through_the_crt_model(run):
    r = pt.crt(run, epochs=2, progress=False, out=run/'posttrain'/'crt-for-tta.csv')
    out = pt.crt_tta_predictions(run, Path(r['out']), run/'posttrain'/'crt-tta.csv')
    assert out == run/'posttrain'/'crt-tta.csv'
    f = pt.read_predictions(out)
    assert sorted(_row_keys(f)) == sorted(_row_keys(pt.read_predictions(run/'predictions.csv')))
    params = json.loads(out.with_suffix('.json').read_text())['params']
    assert params == {'step': 'cRT+TTA', 'run': str(run), 'views': ['identity', 'hflip'],
                      'classifier': str(Path(r['classifier'])), 'log_odds_scale': 1.0, 'fitted_on': 'train'}
    # each row: the mean of the probabilities of the image and of its mirror through the cRT model (an independent pass)
    model, data = pt.load_crt_model(run, Path(r['classifier'])), Run(run).datasets()
    for split in ('val', 'dev', 'test'):
        x = torch.stack([data[split]['dataset'][i][0] for i in range(3)])
        with torch.no_grad(): p = ((torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1)))) / 2).double().numpy()
        rows = f[f.split == split].set_index('ImageID').loc[data[split]['table'].ImageID[:3], CLASSES].to_numpy()
        np.testing.assert_allclose(rows, p, atol=1e-5)


def test_the_package_gathers_its_modules():
    import importlib, inspect
    for module in ('calibration', 'ensembles', 'retrain'): importlib.import_module(f'cxrlt.posttrain.{module}')
    for name in ('calibrate', 'ensemble', 'crt'):   # the functions, not the modules of the same idea
        assert inspect.isfunction(getattr(pt, name)), name
    module, name = cxrlt.cli.COMMANDS['submit'][0].split(':')
    assert getattr(importlib.import_module(module), name) is cxrlt.posttrain.submit.submit_cli
    for name in pt.__all__: assert hasattr(pt, name), name


def _long_tail(n, seed, mu=None, C=8, D=16):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, C)) < np.geomspace(0.3, 0.004, C)).astype(np.float32)
    if mu is None: mu = rng.normal(size=(C, D)); mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    return (y @ mu * 3 + rng.normal(size=(n, D))).astype(np.float32), y, mu


@pytest.mark.parametrize('seed', [10, 11])
def test_crt_raises_tail_ap_on_a_long_tailed_feature_set(seed):
    X, Y, mu = _long_tail(4000, seed)
    Xt, Yt, _ = _long_tail(4000, seed + 100, mu)
    tail = {}
    for sampler in ('instance', 'class_aware'):
        clf, _ = pt.train_classifier(X, Y, sampler=sampler, epochs=5, batch_size=128, seed=seed)
        with torch.no_grad(): s = clf(torch.from_numpy(Xt)).numpy()
        tail[sampler] = np.mean([average_precision_score(Yt[:, j], s[:, j]) for j in range(5, 8)])
    assert tail['class_aware'] > tail['instance'] + 0.05, tail


# --- TTA, calibration, thresholds, ensembles on the run ---------------------------------------------------------

def test_tta_identity_equals_the_runs_own_inference(run):
    r = pt.tta_predictions(run, ['identity'], out=run/'posttrain'/'tta-identity.csv', device='cpu', progress=False)
    tta, own = pt.read_predictions(r['out']), pt.read_predictions(run/'predictions.csv')
    own = own.set_index(_row_keys(own)).loc[_row_keys(tta)]
    np.testing.assert_allclose(tta[pt.LOGIT_COLUMNS].to_numpy(), own[pt.LOGIT_COLUMNS].to_numpy(), atol=1e-4)
    assert r['val']['after']['mAP'] == pytest.approx(r['val']['before']['mAP'], abs=1e-6)


def test_chain_of_post_training_files(run):
    r_tta = pt.tta_predictions(run, ['identity', 'hflip', 'shift=0.05,0'], merge='logit', device='cpu', progress=False)
    r_cal = pt.calibrate(run/'predictions.csv', 'platt')
    assert r_cal['val']['nll_after'] < r_cal['val']['nll_before'] and 'test' in r_cal
    r_thr = pt.threshold_predictions(r_cal['out'], 'youden')
    assert Path(r_thr['thresholds']).exists()
    r_ens = pt.ensemble([run/'predictions.csv', r_tta['out'], r_thr['out']], run/'posttrain'/'rank.csv', 'rank')
    from cxrlt.metrics import evaluate
    labels = pt.read_labels(run)
    for path in (r_tta['out'], r_cal['out'], r_thr['out'], r_ens['out']):
        f = pt.read_predictions(path)
        assert list(f.columns) == ['ImageID', 'split'] + CLASSES + pt.LOGIT_COLUMNS
        assert json.loads(Path(path).with_suffix('.json').read_text())['params']['step']
        test = f[f.split == 'test']
        assert 0 <= evaluate(pt.labels_for(labels, test.ImageID), test[CLASSES].to_numpy()).summary['mAP'] <= 1
    # thresholds move the decisions, not the ranking
    cal, thr = (pt.read_predictions(p) for p in (r_cal['out'], r_thr['out']))
    order = lambda f: np.argsort(f[CLASSES].to_numpy(), 0, kind='stable')
    assert np.array_equal(order(cal), order(thr))


# --- cxrlt submit ----------------------------------------------------------------------------------------------

def submit(monkeypatch, *args):
    monkeypatch.setitem(cxrlt.cli.COMMANDS, 'submit', ('cxrlt.posttrain:submit_cli', 'write the challenge submission'))
    return cxrlt.cli.main(['submit', *map(str, args)])


def test_submit_writes_a_valid_zip(run, tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path/'submission.zip'
    assert submit(monkeypatch, '--predictions', run/'predictions.csv', '--test_csv', tiny/'test.csv', '--out', out) == 0
    assert 'submission.csv with 24 test images x 30 classes' in capsys.readouterr().out
    test_ids = pd.read_csv(tiny/'test.csv').ImageID.tolist()
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        sub = pd.read_csv(z.open('submission.csv'), dtype={'ImageID': str})
        for module in (pt, cxrlt.posttrain.submit):   # the package's sources, sub-modules included
            assert z.read(f'code/cxrlt/posttrain/{Path(module.__file__).name}') == Path(module.__file__).read_bytes()
    assert names[0] == 'submission.csv' and 'code/settings.ini' in names
    assert not any('__pycache__' in n or n.endswith('.pyc') for n in names)
    assert list(sub.columns) == ['ImageID'] + CLASSES and sub.ImageID.tolist() == test_ids
    own = pt.read_predictions(run/'predictions.csv')
    own = own[own.split == 'test'].set_index('ImageID').loc[test_ids, CLASSES]
    np.testing.assert_array_equal(sub[CLASSES].to_numpy(), own.to_numpy())
    meta = json.loads(out.with_suffix('.json').read_text())
    assert meta['n_images'] == 24 and meta['zip_sha256'] == pt.file_sha256(out)


def test_submit_ships_a_given_code_dir(run, tiny, tmp_path, monkeypatch):
    code = tmp_path/'code'; (code/'pkg'/'__pycache__').mkdir(parents=True); (code/'.git').mkdir()
    (code/'train.py').write_text('print(1)\n'); (code/'pkg'/'m.py').write_text('x = 1\n')
    (code/'pkg'/'__pycache__'/'m.cpython-311.pyc').write_bytes(b'\0'); (code/'.git'/'HEAD').write_text('ref\n')
    out = tmp_path/'sub.zip'
    assert submit(monkeypatch, '--predictions', run/'predictions.csv', '--test_csv', tiny/'test.csv', '--out', out,
                  '--code_dir', code) == 0
    with zipfile.ZipFile(out) as z: assert sorted(z.namelist()) == ['code/pkg/m.py', 'code/train.py', 'sub.csv']


def _edited(run, tmp_path, edit):
    f = pd.read_csv(run/'predictions.csv', dtype={'ImageID': str}, keep_default_na=False)
    f = edit(f.astype({c: object for c in CLASSES}))
    f.to_csv(tmp_path/'edited.csv', index=False)
    return tmp_path/'edited.csv'

def _test_rows(f): return np.flatnonzero((f.split == 'test').to_numpy())

def _set(column, value):
    def edit(f): f.loc[_test_rows(f)[1], column] = value; return f
    return edit

REFUSALS = {
    'missing ImageIDs': (lambda f: f.drop(index=_test_rows(f)[:2]), '2 of the 24 test ImageIDs have no prediction'),
    'extra ImageIDs': (lambda f: pd.concat([f, f.iloc[_test_rows(f)[:1]].assign(ImageID='stranger.png')]),
                       "1 predicted ImageIDs are not in the test CSV (e.g. ['stranger.png'])"),
    'duplicate ImageID': (lambda f: pd.concat([f, f.iloc[_test_rows(f)[:1]]]),
                          "in split 'test'; every image must have one prediction"),
    'NaN': (_set('Mass', ''), "column 'Mass' holds an empty cell on line"),
    'NaN written as text': (_set('Mass', 'nan'), "column 'Mass' holds 'nan', which is not a finite number"),
    'not a number': (_set('Hernia', 'yes'), "column 'Hernia' holds 'yes', which is not a finite number"),
    'above 1': (_set('Normal', 1.2), "column 'Normal' holds 1.2 on line"),
    'below 0': (_set('Normal', -0.01), "column 'Normal' holds -0.01 on line"),
    'a class column missing': (lambda f: f.drop(columns='Kyphosis'),
                               "wrong columns: 29 of the 30 probability columns; missing ['Kyphosis']"),
    'an unknown column': (lambda f: f.assign(confidence=1.0),
                          "wrong columns: 30 of the 30 probability columns; unknown columns ['confidence']"),
    'no test rows': (lambda f: f[f.split == 'val'], "has no rows with split 'test'"),
}

@pytest.mark.parametrize('case', list(REFUSALS))
def test_submit_refuses(case, run, tiny, tmp_path, monkeypatch, capsys):
    edit, message = REFUSALS[case]
    out = tmp_path/'submission.zip'
    assert submit(monkeypatch, '--predictions', _edited(run, tmp_path, edit), '--test_csv', tiny/'test.csv',
                  '--out', out) == 2
    err = capsys.readouterr().err
    assert err.startswith('cxrlt submit: ') and err.count('\n') == 1 and message in err, err
    assert not out.exists() and not out.with_suffix('.json').exists()


def test_submit_refuses_bad_inputs(run, tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path/'submission.zip'
    assert submit(monkeypatch, '--predictions', run/'predictions.csv', '--out', out) == 2
    assert capsys.readouterr().err.strip() == 'cxrlt submit: --test_csv required'
    (tmp_path/'test.csv').write_text('ImageID,StudyDate_DICOM,PatientID\n'
                                     'tst0000.png,20200101,1\ntst0000.png,20200101,1\n')
    assert submit(monkeypatch, '--predictions', run/'predictions.csv', '--test_csv', tmp_path/'test.csv',
                  '--out', out) == 2
    assert "'tst0000.png' appears on lines 2, 3" in capsys.readouterr().err
    assert submit(monkeypatch, '--predictions', tmp_path/'none.csv', '--test_csv', tiny/'test.csv', '--out', out) == 2
    assert 'none.csv does not exist' in capsys.readouterr().err
    assert submit(monkeypatch, '--predictions', run/'predictions.csv', '--test_csv', tiny/'test.csv', '--out', out,
                  '--code_dir', tmp_path/'nowhere') == 2
    assert 'is not a folder' in capsys.readouterr().err
    assert submit(monkeypatch, '--predictions', run/'predictions.csv', '--test_csv', tiny/'test.csv',
                  '--out', tmp_path/'sub.tar') == 2
    assert 'out must be a .zip file' in capsys.readouterr().err
    assert not out.exists()


def test_validate_submission_checks_a_finished_table(run, tiny):
    test_ids = pd.read_csv(tiny/'test.csv').ImageID.tolist()
    table = pt.submission_table(pt.read_predictions(run/'predictions.csv'), test_ids)
    pt.validate_submission(table, test_ids)
    with pytest.raises(pt.SubmissionError, match='has 32 columns; a CXR-LT submission has 31'):
        pt.validate_submission(table.assign(x=0), test_ids)
    with pytest.raises(pt.SubmissionError, match="column 1 is 'image_id'"):
        pt.validate_submission(table.rename(columns={'ImageID': 'image_id'}), test_ids)
    with pytest.raises(pt.SubmissionError, match="holds nan"):
        pt.validate_submission(table.assign(Mass=np.nan), test_ids)
