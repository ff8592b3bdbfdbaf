"""cRT (Kang et al. 2020) on fixed features and on a real (tiny) run: every registered loss against a scikit-learn
reference, the mean entry loss, the loss's class counts, features of augmented views, τ-norm as published, and the
scale cRT+TTA reads."""
import json, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

import cxrlt.posttrain as pt
import cxrlt.posttrain.retrain
import cxrlt.train
from conftest import quiet_fit, tiny_challenge
from cxrlt.core import load_checkpoint
from cxrlt.labels import CLASSES
from cxrlt.losses import LOSSES, ldam_margins, make_loss
from cxrlt.run import Run

torch.set_num_threads(1)   # small tensors on a shared CPU: one thread is much faster

TOLERANCE = 0.05   # a cRT classifier's held-out macro AP may lie this far below the logistic-regression reference
CRT_LOSSES = [name for name, cls in LOSSES.items() if not cls.deferred_reweighting]   # DRW losses: cRT uses without_drw


def _pooled_features(n, seed, mu=None, C=8, D=128):
    """Non-negative features (N, D) like a backbone's pooled ones: class j adds 3·μⱼ before a ReLU; class prevalences
    from 30 % to 3 %, class 0 marks the images without another class (as CXR-LT's 'Normal')."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, C)) < np.r_[0, np.geomspace(0.3, 0.03, C - 1)]).astype(np.float32)
    y[:, 0] = y[:, 1:].sum(1) == 0
    if mu is None: mu = rng.normal(size=(C, D)); mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    return np.maximum(y @ mu * 3 + rng.normal(size=(n, D)), 0).astype(np.float32), y, mu


def _macro_ap(y, scores):
    return np.mean([average_precision_score(y[:, j], scores[:, j]) for j in range(y.shape[1]) if y[:, j].any()])


@pytest.fixture(scope='module')
def planted():
    "Training and held-out rows of one planted linear signal, and the reference's held-out macro AP."
    X, Y, mu = _pooled_features(3000, 0)
    Xt, Yt, _ = _pooled_features(3000, 10, mu)
    ref = np.stack([LogisticRegression(max_iter=1000).fit(X, Y[:, j]).decision_function(Xt)
                    for j in range(Y.shape[1])], 1)
    return X, Y, Xt, Yt, _macro_ap(Yt, ref)


# --- the classifier on fixed features ---------------------------------------------------------------------------

@pytest.mark.parametrize('loss', CRT_LOSSES)
def test_every_registered_loss_ranks_like_logistic_regression(planted, loss):
    "Every loss, built as cRT builds it (its preferred head, the counts of what the sampler draws), at one lr."
    X, Y, Xt, Yt, reference = planted
    clf, history = pt.train_classifier(X, Y, head=LOSSES[loss].preferred_head, loss=loss, batch_size=64)
    with torch.no_grad(): z = clf(torch.from_numpy(Xt)).numpy()
    assert np.isfinite(z).all() and np.isfinite(history.train_loss).all()
    assert _macro_ap(Yt, z) >= reference - TOLERANCE, (loss, _macro_ap(Yt, z), reference)


@pytest.mark.parametrize('loss,kwargs', [('asl', {}), ('bce', {'reduction': 'sum'}), ('focal', {})])
def test_one_sgd_step_follows_the_gradient_of_the_mean_entry_loss(loss, kwargs):
    "w₁ = w₀ − lr·∇ mean over (image, class) entries, whatever the loss's own reduction (ASL's is 'sum')."
    X, Y, _ = _pooled_features(64, 1, C=5, D=12)
    step = dict(loss=loss, loss_kwargs=kwargs, sampler='instance', epochs=1, batch_size=64, momentum=0.0,
                weight_decay=0.0, seed=3)
    w0, _ = pt.train_classifier(X, Y, lr=0.0, **step)            # lr 0: the initial classifier
    w1, _ = pt.train_classifier(X, Y, lr=0.05, **step)           # one step over all 64 rows (the mean ignores order)
    W, b = (p.detach().double().requires_grad_() for p in (w0.weight, w0.bias))
    loss_fn = make_loss(loss, np.maximum(Y.sum(0), 1), n_images=len(Y), **kwargs)
    mean = loss_fn.elementwise(torch.from_numpy(X).double() @ W.T + b, torch.from_numpy(Y).double()).mean()
    mean.backward()
    np.testing.assert_allclose(w1.weight.detach().double(), (W - 0.05 * W.grad).detach(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(w1.bias.detach().double(), (b - 0.05 * b.grad).detach(), rtol=0, atol=1e-6)


def test_the_losss_own_reduction_does_not_change_the_classifier():
    X, Y, _ = _pooled_features(400, 2, C=5, D=12)
    weights = [pt.train_classifier(X, Y, loss='asl', loss_kwargs={'reduction': r}, epochs=2, batch_size=32)[0].weight
               for r in ('sum', 'mean', 'none')]
    for w in weights[1:]: assert torch.equal(w, weights[0])


def test_sampled_loss_counts_are_the_counts_of_the_drawn_rows(monkeypatch):
    X, Y, _ = _pooled_features(600, 3, C=5, D=12)
    real, seen = cxrlt.posttrain.retrain._classifier_epoch, []
    def recorded(clf, loss_fn, X, Y, idx, *a):
        seen.append((idx.clone(), loss_fn))
        return real(clf, loss_fn, X, Y, idx, *a)
    monkeypatch.setattr(cxrlt.posttrain.retrain, '_classifier_epoch', recorded)
    _, h = pt.train_classifier(X, Y, head='normed', loss='ldam', epochs=2, seed=5)
    drawn = seen[0][0].numpy()                                            # the rows the first epoch trained on
    counts = np.maximum(np.bincount(np.nonzero(Y[drawn])[1], minlength=Y.shape[1]), 1)
    assert h.attrs['loss_counts'] == 'sampled' and h.attrs['class_counts'] == counts.tolist()
    assert h.attrs['n_images'] == len(drawn) == len(Y)
    torch.testing.assert_close(seen[0][1].margins, ldam_margins(counts))
    assert not torch.equal(seen[1][0], seen[0][0])                       # the second epoch draws other rows
    # logit adjustment: the prior log-odds of the drawn rows, in float64
    seen.clear()
    pt.train_classifier(X, Y, loss='logit_adjusted_bce', epochs=1, seed=6)
    drawn = seen[0][0].numpy()
    pi = np.maximum(Y[drawn].sum(0, dtype=np.float64), 1) / len(drawn)
    np.testing.assert_allclose(seen[0][1].adjustments.numpy(), np.log(pi / (1 - pi)), rtol=0, atol=1e-6)
    # 'natural': the counts of all rows (the double compensation of the behaviour before)
    seen.clear()
    _, h = pt.train_classifier(X, Y, head='normed', loss='ldam', epochs=1, seed=5, loss_counts='natural')
    assert h.attrs['class_counts'] == np.maximum(Y.sum(0), 1).astype(int).tolist()
    torch.testing.assert_close(seen[0][1].margins, ldam_margins(np.maximum(Y.sum(0), 1)))


# --- on a trained run -------------------------------------------------------------------------------------------

K = 2   # training views of the cache on the shared run


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    from cxrlt.datasets import AugmentConfig
    tiny = tiny_challenge(tmp_path_factory.mktemp('crt'), n_train=80, n_test=24)
    cfg = cxrlt.train.TrainConfig(train_csv=tiny/'train.csv', train_cache=tiny/'cache', test_csv=tiny/'test.csv',
                                  test_cache=tiny/'cache', test_labels_csv=tiny/'test_labels.csv', out_dir=tiny/'runs',
                                  backbone='resnet10t', epochs=1, batch_size=16, lr=3e-3, progress=False,
                                  deterministic=True, val_fraction=0.25, seed=7, augment=AugmentConfig())
    return quiet_fit(cfg)


def _eval_splits(run):
    return [s for s in ('val', 'dev', 'test') if s in Run(run).datasets()]


def test_feature_cache_holds_features_of_seeded_augmented_views(run):
    from cxrlt.datasets import CachedImageDataset, train_augmentation
    from cxrlt.models import forward_features
    folder = pt.feature_cache(run, progress=False, train_views=K)
    meta = json.loads((folder/'features.json').read_text())
    cfg, data, model = Run(run).config, Run(run).datasets(), Run(run).best_model()
    assert (meta['fingerprint']['train_views'], meta['fingerprint']['augment'], meta['fingerprint']['augment_seed']) \
        == (K, cfg.augment.to_dict(), 7)
    n = len(data['train']['table'])
    f = pt.load_features(run, 'train', train_views=K)
    assert f['features'].shape == (K * n, model.num_features)
    assert f['image_ids'] == data['train']['table'].ImageID.tolist() * K
    np.testing.assert_array_equal(f['labels'], np.tile(data['train']['labels'], (K, 1)))
    np.testing.assert_array_equal(f['passes'], np.repeat(np.arange(K), n))
    # row (k, i): the backbone's features of image i through the run's augmentation seeded by SeedSequence([seed, k, i])
    augmented = CachedImageDataset(cfg.train_cache, data['train']['table'].ImageID,
                                   transform=train_augmentation(cfg.augment))
    for k in range(K):
        for i in (0, 5, n - 1):
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, k, i]).generate_state(1)[0]))
            with torch.no_grad(): ref = forward_features(model, augmented[i][None]).numpy()[0]
            np.testing.assert_allclose(f['features'][k * n + i], ref, atol=1e-5)
    assert not np.allclose(f['features'][:n], f['features'][n:], atol=1e-3)       # the passes saw other views
    # the evaluation splits stay un-augmented
    for split in _eval_splits(run):
        e = pt.load_features(run, split)
        assert (e['passes'] == -1).all() and e['image_ids'] == data[split]['table'].ImageID.tolist()
        for i in (0, len(e['image_ids']) - 1):
            with torch.no_grad(): ref = forward_features(model, data[split]['dataset'][i][0][None]).numpy()[0]
            np.testing.assert_allclose(e['features'][i], ref, atol=1e-5)


def test_augmented_cache_is_reproducible_resumable_and_follows_its_settings(run, tmp_path, monkeypatch):
    a, b = tmp_path/'a', tmp_path/'b'
    for d in (a, b): shutil.copytree(run, d, ignore=shutil.ignore_patterns('features*', 'posttrain'))
    real, calls = pt.extract_features, []
    def interrupted(model, dataset, *args, desc='', **kw):
        calls.append(desc)
        if desc == 'features train view 2/3' and calls.count(desc) == 1: raise KeyboardInterrupt
        return real(model, dataset, *args, desc=desc, **kw)
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features', interrupted)
    with pytest.raises(KeyboardInterrupt): pt.feature_cache(a, progress=False, train_views=3)
    assert (a/'features.partial'/'train.view0.npy').exists() and not (a/'features').exists()
    pt.feature_cache(a, progress=False, train_views=3)
    assert calls == ['features train view 1/3', 'features train view 2/3', 'features train view 2/3',
                     'features train view 3/3'] + [f'features {s}' for s in _eval_splits(run)]   # view 1 not again
    assert sorted(p.name for p in (a/'features').iterdir() if 'view' in p.name) == []
    pt.feature_cache(b, progress=False, train_views=3)                 # built in one go: the same features, bit for bit
    for split in ['train'] + _eval_splits(run):
        np.testing.assert_array_equal(pt.load_features(a, split)['features'], pt.load_features(b, split)['features'])
    # the same settings find the cache; other views or another augmentation rebuild it, and loading checks K
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features', lambda *a, **k: pytest.fail('the backbone ran'))
    pt.feature_cache(a, progress=False, train_views=3)
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features', real)
    pt.feature_cache(a, progress=False, train_views=0)
    f = pt.load_features(a, 'train', train_views=0)
    assert (f['passes'] == -1).all() and len(f['image_ids']) == len(Run(run).datasets()['train']['table'])
    with pytest.raises(RuntimeError, match='holds 0 training views, not 3'): pt.load_features(a, 'train', train_views=3)
    manifest = json.loads((b/'manifest.json').read_text())
    manifest['params']['augment']['hflip'] = 0.0
    (b/'manifest.json').write_text(json.dumps(manifest))
    before = np.array(pt.load_features(b, 'train')['features'])
    pt.feature_cache(b, progress=False, train_views=3)
    assert json.loads((b/'features'/'features.json').read_text())['fingerprint']['augment']['hflip'] == 0.0
    assert not np.array_equal(pt.load_features(b, 'train')['features'], before)


def test_crt_trains_on_the_views_and_records_its_choices(run, monkeypatch):
    pt.feature_cache(run, progress=False, train_views=K)
    real, seen = cxrlt.posttrain.retrain._classifier_epoch, []
    def recorded(clf, loss_fn, X, Y, idx, *a):
        seen.append(idx.clone())
        return real(clf, loss_fn, X, Y, idx, *a)
    monkeypatch.setattr(cxrlt.posttrain.retrain, '_classifier_epoch', recorded)
    monkeypatch.setattr(cxrlt.posttrain.retrain, 'extract_features', lambda *a, **k: pytest.fail('the backbone ran'))
    r = pt.crt(run, head='normed', loss='ldam', epochs=2, train_views=K, progress=False,
               out=run/'posttrain'/'crt-views.csv')
    train = pt.load_features(run, 'train')
    n = len(train['image_ids']) // K
    assert [len(i) for i in seen] == [n, n]                              # N draws per epoch, from the K·N rows
    assert seen[0].max() >= n                                            # ... which reach the second view
    params = json.loads(Path(r['out']).with_suffix('.json').read_text())['params']
    counts = np.maximum(train['labels'][seen[0].numpy()].sum(0), 1).astype(int).tolist()
    assert (params['fitted_on'], params['train_views'], params['loss_counts']) == ('train', K, 'sampled')
    assert (params['loss_class_counts'], params['loss_n_images']) == (counts, n)
    assert load_checkpoint(r['classifier'])['params'] == {k: v for k, v in params.items() if k != 'report'}
    f = pt.read_predictions(r['out'])
    assert sorted(f.split.unique()) == sorted(_eval_splits(run)) and 'dev' in _eval_splits(run)
    assert set(r) >= set(_eval_splits(run))   # each labelled split compared with the run's own predictions
    # 'natural': the counts of all training rows, K per image (the same shares as the images')
    r = pt.crt(run, head='normed', loss='ldam', epochs=1, train_views=K, loss_counts='natural', progress=False,
               out=run/'posttrain'/'crt-natural.csv')
    params = json.loads(Path(r['out']).with_suffix('.json').read_text())['params']
    y = Run(run).datasets()['train']['labels']
    assert (params['loss_counts'], params['loss_n_images']) == ('natural', K * n)
    assert params['loss_class_counts'] == np.maximum(K * y.sum(0), 1).astype(int).tolist()


def run_loss_scale(run):
    return pt.run_loss(run, Run(run).datasets()['train']['labels']).logit_scale


def test_crt_tta_uses_the_scale_saved_with_the_classifier(run):
    "A BCE run (log-odds = outputs) re-trained with LDAM on a cosine head: cRT+TTA's log-odds are 30 × cosines."
    assert run_loss_scale(run) == 1.0
    r = pt.crt(run, head='normed', loss='ldam', epochs=1, train_views=K, progress=False,
               out=run/'posttrain'/'crt-ldam-tta.csv')
    assert load_checkpoint(r['classifier'])['log_odds_scale'] == 30.0
    out = pt.crt_tta_predictions(run, r['out'], run/'posttrain'/'crt-ldam-tta-flip.csv')
    params = json.loads(out.with_suffix('.json').read_text())['params']
    assert (params['log_odds_scale'], params['fitted_on']) == (30.0, 'train')
    f = pt.read_predictions(out)
    assert sorted(f.split.unique()) == sorted(_eval_splits(run))
    model, data = pt.load_crt_model(run, r['classifier']), Run(run).datasets()
    for split in _eval_splits(run):
        x = torch.stack([data[split]['dataset'][i][0] for i in range(3)])
        with torch.no_grad(): cos = torch.stack([model(x), model(x.flip(-1))]).double()
        p = torch.sigmoid(30 * cos).mean(0).numpy()
        rows = f[f.split == split].set_index('ImageID').loc[data[split]['table'].ImageID[:3], CLASSES].to_numpy()
        np.testing.assert_allclose(rows, p, atol=1e-5)


def test_tau_norm_is_the_published_formula_on_the_runs_own_classifier(run):
    pt.feature_cache(run, progress=False, train_views=K)
    r = pt.tau_norm(run, progress=False)
    ck = torch.load(run/'best.pt', weights_only=False)['model']
    W = ck['fc.weight'].double().numpy()                                   # resnet10t's classifier, read from best.pt
    params = json.loads(Path(r['out']).with_suffix('.json').read_text())['params']
    assert (params['fitted_on'], params['bias'], params['taus']) == ('val', False, list(pt.TAU_GRID))
    assert params['tau'] == r['tau'] in pt.TAU_GRID and [g['tau'] for g in params['grid']] == list(pt.TAU_GRID)
    f = pt.read_predictions(r['out'])
    assert sorted(f.split.unique()) == sorted(_eval_splits(run))
    for split in _eval_splits(run):
        x = np.asarray(pt.load_features(run, split)['features'], np.float64)
        ref = x @ (W / np.linalg.norm(W, axis=1, keepdims=True) ** r['tau']).T    # no bias
        np.testing.assert_allclose(pt.log_odds(f[f.split == split]), ref, rtol=0, atol=1e-6)
    # with independent sigmoids τ changes no class's ranking: every τ has the same val mAP; the NLL decides
    grid = params['grid']
    assert max(g['mAP'] for g in grid) - min(g['mAP'] for g in grid) < 1e-9
    assert r['tau'] == min(grid, key=lambda g: g['nll'])['tau'] and len({g['nll'] for g in grid}) > 1
    assert r['in_sample'] == ['val']


def test_tau_norm_chooses_tau_on_val_only(run, tmp_path):
    pt.feature_cache(run, progress=False, train_views=K)
    copy = tmp_path/run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns('posttrain'))
    grid = lambda: json.loads(Path(pt.tau_norm(copy, progress=False)['out']).with_suffix('.json').read_text())['params']
    before = grid()
    rng = np.random.default_rng(0)
    for split in [s for s in _eval_splits(run) if s != 'val']:           # dev and test labels shuffled: nothing moves
        y = np.load(copy/'features'/f'{split}_labels.npy')
        np.save(copy/'features'/f'{split}_labels.npy', y[rng.permutation(len(y))])
    after = grid()
    assert (after['tau'], after['grid']) == (before['tau'], before['grid'])
    y = np.load(copy/'features'/'val_labels.npy')                       # val labels shuffled: the scores move
    np.save(copy/'features'/'val_labels.npy', y[rng.permutation(len(y))])
    assert grid()['grid'] != before['grid']


def test_tau_norm_refuses_a_cosine_head(run, tmp_path):
    copy = tmp_path/run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns('features*', 'posttrain'))
    manifest = json.loads((copy/'manifest.json').read_text())
    manifest['params']['head'] = 'normed'
    (copy/'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has a 'normed' head"): pt.tau_norm(copy, progress=False)
    assert not (copy/'features').exists()                                 # refused before any feature was computed
