"Training runs as users start them: `cxrlt train` in a subprocess, killed and resumed, under torchrun with 2 processes."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_challenge
from cxrlt.labels import CLASSES

BIN = Path(sys.executable).parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "96 training images, each class a bright square at its own place; cached at 32 px."
    return tiny_challenge(tmp_path_factory.mktemp('tiny'))


def write_config(folder, out, **kw):
    cfg = {'train_csv': str(folder/'train.csv'), 'train_cache': str(folder/'cache'), 'out_dir': str(out),
           'backbone': 'resnet10t', 'epochs': 4, 'batch_size': 16, 'lr': 0.003, 'val_fraction': 0.25,
           'deterministic': True, 'progress': False, 'run_name': 'row', **kw}
    path = Path(out).with_suffix('.yaml')
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config, *extra, launcher=(), env=None):
    return subprocess.run([*launcher, str(BIN/'cxrlt'), 'train', '--config', str(config), *extra],
                          capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=600)


def outputs(run_dir):
    run_dir = Path(run_dir)
    m = json.loads((run_dir/'metrics.json').read_text())
    return (run_dir/'predictions.csv').read_bytes(), m['val'], (run_dir/'history.csv').read_text().splitlines()[0]


@pytest.fixture(scope='module')
def reference(tiny):
    r = train(write_config(tiny, tiny/'ref'))
    assert r.returncode == 0, r.stderr[-3000:]
    return tiny/'ref'/'row'


def test_same_seed_same_results(tiny, reference):
    r = train(write_config(tiny, tiny/'again'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert outputs(tiny/'again'/'row')[:2] == outputs(reference)[:2]


def test_smoke_run_learns_head_classes(reference):
    per_class = pd.read_csv(reference/'val'/'per_class.csv', index_col='class')
    head = per_class[(per_class.group == 'head') & per_class.AUC.notna()]
    assert len(head) >= 3
    assert head.AUC.mean() > 0.6, head.AUC


def test_kill_and_resume_is_bit_identical(tiny, reference):
    out = tiny/'killed'
    config = write_config(tiny, out)
    p = subprocess.Popen([str(BIN/'cxrlt'), 'train', '--config', str(config)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ENV)
    history = out/'row'/'history.csv'
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 2: break  # epoch 1 of 4 is checkpointed
        time.sleep(0.02)
    assert p.poll() is None, 'the run ended before it could be killed'
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((out/'row'/'manifest.json').read_text())['status'] == 'running'
    r = train(config)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming row after epoch' in (out/'row'/'log.txt').read_text()
    assert outputs(out/'row')[:2] == outputs(reference)[:2]


def test_two_processes_match_one(tiny):
    """torchrun with 2 gloo processes, batch 8 each, equals 1 process with batch 16 (LayerNorm backbone), with the
    default augmentations on the device: each rank applies its images' share of one draw for the global batch."""
    common = dict(backbone='convnext_atto', epochs=2, lr=0.002)
    r1 = train(write_config(tiny, tiny/'one', **common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = train(write_config(tiny, tiny/'two', **common),
               launcher=(str(BIN/'torchrun'), '--standalone', '--nproc_per_node=2', '--no-python'))
    assert r2.returncode == 0, r2.stderr[-3000:]
    p1, p2 = (pd.read_csv(tiny/d/'row'/'predictions.csv') for d in ('one', 'two'))
    assert p1.ImageID.tolist() == p2.ImageID.tolist()
    logits = [c for c in p1.columns if c.startswith('logit:')]
    assert np.abs(p1[logits].to_numpy() - p2[logits].to_numpy()).max() < 1e-3  # stated tolerance: float summation order
    m1, m2 = (json.loads((tiny/d/'row'/'metrics.json').read_text())['val']['mAP'] for d in ('one', 'two'))
    assert abs(m1 - m2) < 1e-3
    # every rank keeps its own generators (distinct augmentation streams), one set per process in last.pt
    from cxrlt.core import load_checkpoint
    rngs = load_checkpoint(tiny/'two'/'row'/'last.pt')['rng']
    assert len(rngs) == 2 and not torch.equal(rngs[0]['torch'], rngs[1]['torch'])
    assert len(load_checkpoint(tiny/'one'/'row'/'last.pt')['rng']) == 1
    settings = json.loads((tiny/'two'/'row'/'manifest.json').read_text())['device_settings']
    assert [settings[k] for k in ('world_size', 'device', 'amp', 'compile')] == [2, 'cpu', 'off', False]


def test_runs_record_their_device_settings(reference):
    "On the CPU every GPU default resolves to off; the manifest keeps the config as given, metrics.json resolves it."
    manifest, metrics = (json.loads((reference/f).read_text()) for f in ('manifest.json', 'metrics.json'))
    expected = {'device': 'cpu', 'world_size': 1, 'amp': 'off', 'channels_last': False, 'compile': False,
                'fused_optimizer': False, 'cudnn_benchmark': False, 'pin_memory': False}
    assert {k: manifest['device_settings'][k] for k in expected} == expected
    assert metrics['device_settings']['compile_error'] is None
    assert manifest['params']['compile'] is None and metrics['params']['compile'] is False
    assert metrics['params']['num_workers'] == manifest['device_settings']['num_workers'] >= 1
    assert 'row on cpu: float32; ' in (reference/'log.txt').read_text()


def test_gpu_switches_run_on_the_cpu_and_compile_falls_back(tiny, tmp_path):
    """channels_last, a fused optimizer and torch.compile asked for on the CPU; the machine has no C++ compiler
    (CXX points nowhere), so compiling fails, the run says so once and trains eagerly to the end."""
    config = write_config(tiny, tmp_path/'gpu', epochs=1, channels_last=True, fused_optimizer=True, compile=True,
                          deterministic=False)
    r = train(config, env={'CXX': str(tmp_path/'no-such-compiler')})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path/'gpu'/'row'
    metrics = json.loads((run/'metrics.json').read_text())
    s = metrics['device_settings']
    assert (s['channels_last'], s['fused_optimizer'], s['compile']) == (True, True, True)
    assert s['compile_error'].startswith('InductorError') and 'C++ compiler' in s['compile_error']
    log = (run/'log.txt').read_text()
    assert log.count('torch.compile failed') == 1 and 'the model runs eagerly from here on' in log
    assert metrics['epochs_run'] == 1 and np.isfinite(metrics['val']['mAP'])


def test_bad_inputs_stop_the_run_before_it_trains(tiny, tmp_path):
    "A test CSV with label columns and an incomplete cache: both named at once, exit 2, no run folder made."
    import shutil
    shutil.copytree(tiny/'cache', tmp_path/'cache')
    (tmp_path/'cache'/'cache.json').write_text((tmp_path/'cache'/'cache.json').read_text().replace(
        '"status": "complete"', '"status": "building"'))
    config = write_config(tiny, tmp_path/'bad', test_csv=str(tiny/'train.csv'), test_cache=str(tmp_path/'cache'))
    r = train(config)
    assert r.returncode == 2, r.stderr[-3000:]
    assert 'run row cannot start; 2 problem(s) with its inputs' in r.stderr, r.stderr[-3000:]
    assert "test_csv: " in r.stderr and "is a label column, which a test CSV must not have" in r.stderr
    assert 'test_cache: ' in r.stderr and 'is not complete' in r.stderr
    assert 'Traceback' not in r.stderr and not (tmp_path/'bad'/'row').exists()


def test_bad_config_key_is_refused(tiny, tmp_path):
    config = write_config(tiny, tmp_path/'bad')
    r = train(config, 'learning_rate=0.1')
    assert r.returncode != 0 and "unknown key 'learning_rate'" in r.stderr


def epochs_before_stopping(val_map, patience:int, max_epochs:int, drw_start_epoch:int=None) -> int:
    """Reference early stopping: stop once `patience` epochs in a row have not beaten the best validation mAP;
    with DRW from (0-based) epoch d, never before epoch d runs, and the count starts again there."""
    best, bad = -np.inf, 0
    for n, v in enumerate(val_map, 1):   # n epochs have run; the next one is 0-based epoch n
        if v > best: best, bad = v, 0
        else: bad += 1
        if n == drw_start_epoch: bad = 0
        waiting = drw_start_epoch is not None and n < drw_start_epoch
        if (bad >= patience and not waiting) or n == max_epochs: return n
    return len(val_map)


def test_reference_early_stopping_waits_for_drw():
    "The reference itself: without DRW it stops at the first patience run; with DRW it waits, then counts afresh."
    assert epochs_before_stopping([0.5, 0.4, 0.3, 0.6, 0.2, 0.1], 1, 6) == 2
    assert epochs_before_stopping([0.5, 0.4, 0.3, 0.6, 0.2, 0.1], 1, 6, drw_start_epoch=3) == 5


def test_the_ema_weights_are_what_is_kept(tiny, tmp_path):
    "With EMA, best.pt holds the averaged weights (what was evaluated), not the raw ones: one epoch, so best = last."
    from cxrlt.core import load_checkpoint
    r = train(write_config(tiny, tmp_path/'ema', epochs=1, ema_decay=0.5, lr=0.01))
    assert r.returncode == 0, r.stderr[-3000:]
    best, last = (load_checkpoint(tmp_path/'ema'/'row'/f) for f in ('best.pt', 'last.pt'))
    assert best['epoch'] == 1
    assert all(torch.equal(best['model'][k], last['ema'][k]) for k in best['model'])
    assert not all(torch.equal(best['model'][k], last['model'][k]) for k in best['model'])  # EMA differs from raw


def test_options_of_a_long_run(tiny, tmp_path):
    "EMA, gradient clipping, accumulation, class-aware sampling, LDAM-DRW with a cosine head, early stopping at once."
    from cxrlt.core import load_checkpoint
    r = train(write_config(tiny, tmp_path/'opts', epochs=6, ema_decay=0.5, grad_clip=1.0, accum_steps=2,
                           sampler='class_aware', loss='ldam', head='normed', drw_start_epoch=2, patience=1,
                           warmup_epochs=0.5, lr=0.01))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path/'opts'/'row'
    h = pd.read_csv(run/'history.csv')
    m = json.loads((run/'metrics.json').read_text())
    assert m['epochs_run'] == len(h) == epochs_before_stopping(h.val_mAP.tolist(), patience=1, max_epochs=6,
                                                               drw_start_epoch=2)
    assert len(h) >= 3   # early stopping never ends a run before DRW has started
    assert h.drw.tolist() == [e > 2 for e in h.epoch]   # DRW is on from (1-based) epoch 3
    assert m['best_epoch_phase'] == ('after DRW' if m['best_epoch'] > 2 else 'before DRW')
    assert m['selected_on'] == 'val' and m['dev'] is not None and m['dev']['mAP'] >= 0
    best = load_checkpoint(run/'best.pt')
    last = load_checkpoint(run/'last.pt')
    assert best['epoch'] == m['best_epoch'] == int(h.val_mAP.idxmax()) + 1
    assert set(last['ema']) == set(last['model'])
    p = pd.read_csv(run/'predictions.csv')
    # the logit columns hold what LDAM trains, s·cosine (|s·z| <= 30), and the probabilities are their sigmoid
    logits = p[[f'logit:{c}' for c in CLASSES]].to_numpy()
    assert np.abs(logits).max() <= 30 + 1e-9 and np.abs(logits).max() > 1
    assert np.allclose(p[CLASSES].to_numpy(), 1 / (1 + np.exp(-logits)), rtol=0, atol=1e-12)
    assert set(p.split) == {'val', 'dev'}


# ---------------------------------------------------------------- pieces of the loop, against hand references

def test_a_short_last_accumulation_group_is_the_mean_of_its_own_batches():
    "3 micro-batches with accum_steps=2: the second step is batch 2's gradient alone, not half of it."
    from cxrlt.train import train_one_epoch
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 6, generator=g), (torch.rand(6, 3, generator=g) > 0.5).float()
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 3)
    for group in ([slice(0, 2), slice(2, 4)], [slice(4, 6)]):   # plain SGD steps on each group's mean gradient
        ref.zero_grad()
        losses = [torch.nn.functional.binary_cross_entropy_with_logits(ref(x[b]), y[b]) for b in group]
        torch.stack(losses).mean().backward()
        with torch.no_grad():
            for q in ref.parameters(): q -= 0.5 * q.grad
    torch.manual_seed(0)
    m = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    train_one_epoch(m, dl, torch.nn.BCEWithLogitsLoss(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                    device=torch.device('cpu'), accum_steps=2, progress=False)
    for a, b in zip(m.parameters(), ref.parameters()): assert torch.allclose(a, b, atol=1e-6)


def test_a_sum_reduced_loss_is_reported_per_image_in_training_and_validation(tiny):
    "ASL (reduction='sum'): the train loss over batches of 4 and 2 and the validation loss are both sum / images."
    import contextlib
    from cxrlt.datasets import CachedImageDataset, normalize_batch
    from cxrlt.labels import class_groups
    from cxrlt.losses import AsymmetricLoss
    from cxrlt.train import TrainConfig, _validate, train_one_epoch
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3 * 32 * 32, generator=g), (torch.rand(6, 30, generator=g) < 0.4).float()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 30))
    with torch.no_grad(): per_image = AsymmetricLoss()(m(x), y).item() / len(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    r = train_one_epoch(m, dl, AsymmetricLoss(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                        device=torch.device('cpu'), progress=False)
    assert r['train_loss'] == pytest.approx(per_image, rel=1e-5)
    # validation reads uint8 rows of the cache and normalises them on the device, 4 images a batch
    ids = pd.read_csv(tiny/'train.csv').ImageID[:6]
    val = CachedImageDataset(tiny/'cache', ids, y.numpy(), normalize=False)
    images = normalize_batch(val.read_batch(range(6))[0])
    with torch.no_grad(): per_val_image = AsymmetricLoss()(m(images), y).item() / len(y)
    v = _validate(m, AsymmetricLoss(), val, y.numpy(), class_groups(y.sum(0).numpy(), len(y)),
                  TrainConfig(progress=False, batch_size=4, num_workers=1), 0, 1, torch.device('cpu'),
                  contextlib.nullcontext)
    assert v['val_loss'] == pytest.approx(per_val_image, rel=1e-5)
