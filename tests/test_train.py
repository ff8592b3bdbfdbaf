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


def train(config, *extra, launcher=()):
    return subprocess.run([*launcher, str(BIN/'cxrlt'), 'train', '--config', str(config), *extra],
                          capture_output=True, text=True, env=ENV, timeout=600)


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
    "torchrun with 2 gloo processes, batch 8 each, equals 1 process with batch 16 (LayerNorm backbone, no augmenting)."
    common = dict(backbone='convnext_atto', epochs=2, lr=0.002,
                  augment={'hflip': 0.0, 'degrees': 0.0, 'translate': 0.0, 'scale': [1.0, 1.0], 'brightness': 0.0,
                           'contrast': 0.0})
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


def test_bad_config_key_is_refused(tiny, tmp_path):
    config = write_config(tiny, tmp_path/'bad')
    r = train(config, 'learning_rate=0.1')
    assert r.returncode != 0 and "unknown key 'learning_rate'" in r.stderr


def epochs_before_stopping(val_map, patience:int, max_epochs:int) -> int:
    "Reference early stopping: stop once `patience` epochs in a row have not beaten the best validation mAP."
    best, bad = -np.inf, 0
    for n, v in enumerate(val_map, 1):
        if v > best: best, bad = v, 0
        else: bad += 1
        if bad >= patience or n == max_epochs: return n
    return len(val_map)


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
    assert m['epochs_run'] == len(h) == epochs_before_stopping(h.val_mAP.tolist(), patience=1, max_epochs=6)
    best = load_checkpoint(run/'best.pt')
    last = load_checkpoint(run/'last.pt')
    assert best['epoch'] == m['best_epoch'] == int(h.val_mAP.idxmax()) + 1
    assert set(last['ema']) == set(last['model'])
    p = pd.read_csv(run/'predictions.csv')
    s = 30.0  # LDAM's scale: probabilities are sigmoid(s * cosine logits)
    logits = p[[f'logit:{c}' for c in CLASSES]].to_numpy()
    assert np.allclose(p[CLASSES].to_numpy(), 1 / (1 + np.exp(-s * logits)), atol=1e-6)
