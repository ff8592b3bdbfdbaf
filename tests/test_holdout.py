"""No fit reads the labels of `dev` or `test`: two runs whose training CSVs differ only in the labels of the dev
images (shuffled between them), and whose test answers are shuffled, make every choice identically — the best epoch
and its weights, cRT's classifier, temperatures, thresholds and ensemble weights — while their dev and test scores
differ."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cxrlt.posttrain as pt
from conftest import quiet_fit, tiny_challenge
from cxrlt.core import load_checkpoint
from cxrlt.labels import CLASSES
from cxrlt.splits import load_split
from cxrlt.train import TrainConfig

torch.set_num_threads(1)


def shuffled(csv:Path, ids, out:Path) -> Path:
    "A copy of a training-format CSV whose images `ids` trade label rows at random (each class keeps its count)."
    df = pd.read_csv(csv, dtype={'PatientID': str})
    m = df.ImageID.isin(set(ids)).to_numpy()
    y = df.loc[m, CLASSES].to_numpy()
    df.loc[m, CLASSES] = y[np.random.default_rng(0).permutation(len(y))]
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope='module')
def twins(tmp_path_factory):
    "The same run trained twice: on the original labels, and with the dev and test labels shuffled."
    from cxrlt.datasets import AugmentConfig
    tiny = tiny_challenge(tmp_path_factory.mktemp('holdout'), n_train=96, n_test=24)
    common = dict(train_cache=tiny/'cache', test_csv=tiny/'test.csv', test_cache=tiny/'cache', backbone='resnet10t',
                  epochs=3, batch_size=16, lr=3e-3, progress=False, deterministic=True, val_fraction=0.25,
                  dev_fraction=0.25, split_file=tiny/'split.csv', run_name='run',
                  augment=AugmentConfig(degrees=0, translate=0, scale=(1, 1)))
    a = quiet_fit(TrainConfig(train_csv=tiny/'train.csv', test_labels_csv=tiny/'test_labels.csv', out_dir=tiny/'a',
                              **common))
    split = load_split(tiny/'split.csv')
    dev_ids, test_ids = split.index[split == 'dev'], pd.read_csv(tiny/'test_labels.csv').ImageID
    b = quiet_fit(TrainConfig(train_csv=shuffled(tiny/'train.csv', dev_ids, tiny/'train_shuffled.csv'),
                              test_labels_csv=shuffled(tiny/'test_labels.csv', test_ids, tiny/'test_shuffled.csv'),
                              out_dir=tiny/'b', **common))
    return a, b


def rows(pred_csv, split):
    p = pd.read_csv(pred_csv)
    return p[p.split == split].set_index('ImageID')[CLASSES]


def test_the_shuffle_reached_the_scores(twins):
    a, b = twins
    ma, mb = (json.loads((r/'metrics.json').read_text()) for r in twins)
    assert ma['dev']['mAP'] != mb['dev']['mAP'] and ma['test']['mAP'] != mb['test']['mAP']
    assert ma['val'] == mb['val']


def test_training_choices_ignore_dev_and_test_labels(twins):
    a, b = twins
    ha, hb = (pd.read_csv(r/'history.csv') for r in twins)
    assert ha.val_mAP.tolist() == hb.val_mAP.tolist() and ha.val_loss.tolist() == hb.val_loss.tolist()
    ba, bb = (load_checkpoint(r/'best.pt') for r in twins)
    assert ba['epoch'] == bb['epoch'] and ba['selected_on'] == 'val'
    assert all(torch.equal(ba['model'][k], bb['model'][k]) for k in ba['model'])
    for split in ('val', 'dev', 'test'):   # the same model predicts the same numbers everywhere
        pd.testing.assert_frame_equal(rows(a/'predictions.csv', split), rows(b/'predictions.csv', split))


def test_post_training_fits_ignore_dev_and_test_labels(twins):
    a, b = twins
    fits = {}
    for run in twins:
        cal = pt.calibrate(run/'predictions.csv', 'class_temperature')
        th = pt.threshold_predictions(run/'predictions.csv')
        ens = pt.ensemble([run/'predictions.csv', cal['out']], run/'posttrain'/'ens.csv', 'weighted')
        crt = pt.crt(run, epochs=3, progress=False)
        fits[run] = {'T': cal['calibrator'].params['temperature'], 'thresholds': th['table'].threshold.tolist(),
                     'weights': ens['weights'], 'fitted_on': (ens['fitted_on'], json.loads(
                         Path(cal['out']).with_suffix('.json').read_text())['params']['fitted_on']),
                     'crt': load_checkpoint(crt['classifier'])['classifier'], 'ece_dev': cal['dev']['ece_after']}
    fa, fb = fits[a], fits[b]
    assert fa['T'] == fb['T'] and fa['thresholds'] == fb['thresholds'] and fa['weights'] == fb['weights']
    assert fa['fitted_on'] == fb['fitted_on'] == ('val', 'val')
    assert all(torch.equal(fa['crt'][k], fb['crt'][k]) for k in fa['crt'])
    assert fa['ece_dev'] != fb['ece_dev']   # the dev report did read the (shuffled) dev labels
