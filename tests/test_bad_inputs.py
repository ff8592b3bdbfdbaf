"""Bad inputs as a demanding new user gives them, through the real `cxrlt` commands: configs, values, runs and
checkpoints, tables and the site. Each case asserts the outcome: exit code 2, one line on stderr naming the
problem, nothing overwritten and no half-made folder. (CSVs, images, DICOMs, caches and kills: test_bad_files.py;
submissions and losses: test_bad_submit.py.)"""
import json, re, shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_challenge
from cxrlt.cli import main
from cxrlt.labels import CLASSES


LOG_LINE = re.compile(r'^\d\d:\d\d:\d\d (INFO|WARNING) cxrlt: ')


def refused(capfd, *args, contains:str, after_logs:bool=False):
    """Run `cxrlt *args`; assert exit code 2 and one stderr line `cxrlt <cmd>: ...` containing `contains` (with
    `after_logs`, after the log lines of work that had started)."""
    capfd.readouterr()
    code = main([str(a) for a in args])
    err = capfd.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f'cxrlt {args[0]}: '), err
    assert all(LOG_LINE.match(ln) for ln in lines[:-1]) if after_logs else len(lines) == 1, err
    assert contains in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "96 training images cached at 32 px."
    return tiny_challenge(tmp_path_factory.mktemp('tiny'))


def config_file(tiny, out, name='run.yaml', **kw):
    cfg = {'train_csv': str(tiny/'train.csv'), 'train_cache': str(tiny/'cache'), 'out_dir': str(out),
           'backbone': 'resnet10t', 'epochs': 1, 'max_batches_per_epoch': 2, 'batch_size': 16,
           'val_fraction': 0.25, 'dev_fraction': 0.1, 'progress': False, 'run_name': 'run', **kw}
    path = Path(out).parent/name
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- configs -----------------------------------------------------------------------------------------------------

def test_missing_config_file(capfd, tmp_path):
    refused(capfd, 'train', '--config', tmp_path/'run.yaml', contains=f'config file {tmp_path/"run.yaml"} does not')


def test_duplicate_yaml_key_is_refused(capfd, tmp_path):
    (tmp_path/'run.yaml').write_text('lr: 1e-3\nepochs: 2\nlr: 1e-4\n')
    refused(capfd, 'train', '--config', tmp_path/'run.yaml', contains="key 'lr' is given twice (line 3, column 1)")


def test_config_that_is_not_yaml_or_utf8(capfd, tmp_path):
    (tmp_path/'bad.yaml').write_text('lr: [1e-3\n')
    refused(capfd, 'train', '--config', tmp_path/'bad.yaml', contains=f'{tmp_path/"bad.yaml"}: ')
    (tmp_path/'latin.yaml').write_bytes('run_name: r\xe9sum\xe9\n'.encode('latin-1'))
    refused(capfd, 'train', '--config', tmp_path/'latin.yaml', contains='is not UTF-8 text')


def test_mistyped_option_is_one_line(capfd):
    refused(capfd, 'train', '--confg', 'x.yaml', contains="unrecognized arguments: --confg — see 'cxrlt train --help'")


@pytest.mark.parametrize('override, message', [
    ('lr=.inf', "key 'lr' expects a finite number, got inf"),
    ('lr=inf', "key 'lr' expects float, got str 'inf'"),
    ('lr=0', 'lr must be in (0, inf), got 0.0'),
    ('ema_decay=2', 'ema_decay must be in (0, 1), got 2.0'),
    ('drop_rate=1.5', 'drop_rate must be in [0, 1), got 1.5'),
    ('momentum=-5', 'momentum must be in [0, 1), got -5.0'),
    ('num_workers=-1', 'num_workers must be in [0, inf), got -1'),
    ('patience=0', 'patience must be in [1, inf), got 0'),
    ('max_batches_per_epoch=0', 'max_batches_per_epoch must be in [1, inf), got 0'),
    ('weight_decay=-1e-2', 'weight_decay must be in [0, inf), got -0.01'),
    ('min_lr_ratio=2', 'min_lr_ratio must be in [0, 1], got 2.0'),
    ('drw_start_epoch=1', 'drw_start_epoch 1 leaves no re-weighted epoch in 1 epochs'),
    ('run_name=a/b', "run_name 'a/b' is not a folder name"),
    ('augment={hflip: 1.5}', 'hflip must be in [0, 1], got 1.5'),
    ('augment={contrast: -0.1}', 'contrast must be in [0, 1], got -0.1'),
    ('lr', "override 'lr' is not of the form key=value"),
])
def test_values_that_cannot_be_meant(capfd, tiny, tmp_path, override, message):
    "Each refused before anything is made: the run folder does not appear."
    refused(capfd, 'train', '--config', config_file(tiny, tmp_path/'runs'), override, contains=message)
    assert not (tmp_path/'runs').exists()


def test_batch_larger_than_the_training_set(capfd, tiny, tmp_path):
    line = refused(capfd, 'train', '--config', config_file(tiny, tmp_path/'runs'), 'batch_size=512',
                   contains='batch_size: 512 is more than the about 62 training images of the split')
    assert 'every epoch would be empty' in line
    assert not (tmp_path/'runs'/'run').exists()


# --- a run: overrides read as numbers, resume and reuse with changed inputs, checkpoints -------------------------

@pytest.fixture(scope='module')
def trained(tiny, tmp_path_factory):
    "The README's example `cxrlt train --config run.yaml lr=3e-4` on a copy of the tiny training CSV."
    d = tmp_path_factory.mktemp('trained')
    shutil.copy(tiny/'train.csv', d/'train.csv')
    config = config_file(tiny, d/'runs', train_csv=str(d/'train.csv'))
    assert main(['train', '--config', str(config), 'lr=3e-4']) == 0
    return d, config


def test_readme_override_is_a_number(trained):
    d, _ = trained
    manifest = json.loads((d/'runs'/'run'/'manifest.json').read_text())
    assert manifest['params']['lr'] == 3e-4 and manifest['status'] == 'completed'
    assert manifest['inputs']['train_csv'] and manifest['inputs']['split_file'] and manifest['inputs']['train_cache']


def test_changing_only_progress_is_not_refused(trained, capfd):
    d, config = trained
    capfd.readouterr()
    assert main(['train', '--config', str(config), 'lr=3e-4', 'progress=true']) == 0
    assert 'cannot' not in capfd.readouterr().err


def test_other_parameters_for_a_named_run_are_refused(trained, capfd):
    d, config = trained
    refused(capfd, 'train', '--config', config, 'lr=1e-2',
            contains="config: parameters differ for ['lr'] (stored: lr=0.0003; now: lr=0.01)")


def _as_unfinished(run_dir):
    "The run as a kill during training leaves it: status running, no metrics."
    m = json.loads((run_dir/'manifest.json').read_text())
    (run_dir/'manifest.json').write_text(json.dumps({**m, 'status': 'running'}))
    (run_dir/'metrics.json').unlink(missing_ok=True)


def test_edited_training_csv_is_refused_for_reuse_and_resume(trained, capfd):
    d, config = trained
    original = (d/'train.csv').read_bytes()
    df = pd.read_csv(d/'train.csv')
    df[CLASSES[1]] = 1 - df[CLASSES[1]]   # labels flipped after the run read them
    df.to_csv(d/'train.csv', index=False)
    try:
        metrics = (d/'runs'/'run'/'metrics.json').read_bytes()
        refused(capfd, 'train', '--config', config, 'lr=3e-4', contains='train_csv: changed since the run read it')
        assert (d/'runs'/'run'/'metrics.json').read_bytes() == metrics   # the finished run is untouched
        _as_unfinished(d/'runs'/'run')
        refused(capfd, 'train', '--config', config, 'lr=3e-4', contains='train_csv: changed since the run read it')
    finally: (d/'train.csv').write_bytes(original)


def test_truncated_checkpoint_on_resume(trained, capfd):
    d, config = trained
    run = d/'runs'/'run'
    _as_unfinished(run)
    last = run/'last.pt'
    last.write_bytes(last.read_bytes()[:1000])
    refused(capfd, 'train', '--config', config, 'lr=3e-4', contains=f'checkpoint {last} cannot be read',
            after_logs=True)


def test_truncated_best_checkpoint_for_grad_cam(tiny, tmp_path, capfd):
    config = config_file(tiny, tmp_path/'runs')
    assert main(['train', '--config', str(config)]) == 0
    best = tmp_path/'runs'/'run'/'best.pt'
    best.write_bytes(best.read_bytes()[:2000])
    refused(capfd, 'cam', '--run', tmp_path/'runs'/'run', '--out', tmp_path/'cam', contains=f'checkpoint {best}',
            after_logs=True)
    assert not (tmp_path/'cam').exists()


# --- the site ------------------------------------------------------------------------------------------------------

def test_site_with_a_missing_explorer_keeps_the_published_one(capfd, tmp_path):
    published = tmp_path/'_site'/'explorer'
    published.mkdir(parents=True)
    (published/'index.html').write_text('<html>the explorer of yesterday</html>')
    refused(capfd, 'site', '--explorer', tmp_path/'nope', '--root', tmp_path,
            contains=f'{tmp_path/"nope"} holds no Grad-CAM explorer')
    assert (published/'index.html').read_text() == '<html>the explorer of yesterday</html>'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['_site']   # no _build made


def test_site_with_a_missing_table(capfd, tmp_path):
    refused(capfd, 'site', '--table', tmp_path/'nope', '--root', tmp_path, contains='does not exist')
    assert list(tmp_path.iterdir()) == []


# --- the table -----------------------------------------------------------------------------------------------------

def test_table_reruns_a_failed_row_with_corrected_data(tmp_path, capfd):
    """Row 2 fails while it trains (its loss overflows); rerun with the data folder corrected (another folder) and
    without the bad override, it trains afresh: no manual delete, the failed run kept aside, a cache per source.
    Then its training CSV changes in place: the row is not reused, it trains again."""
    assert main(['synth', '--preset', 'tiny', '--out', str(tmp_path/'a')]) == 0
    shutil.copytree(tmp_path/'a', tmp_path/'b')
    table = tmp_path/'table'
    code = main(['table', '--preset', 'smoke', '--rows', '2', '--data', str(tmp_path/'a'), '--out', str(table),
                 '--overrides', json.dumps({'2': {'lr': 1e30}})])
    assert code == 1 and (table/'rows'/'row02'/'error.json').exists()
    capfd.readouterr()
    assert main(['table', '--preset', 'smoke', '--rows', '2', '--data', str(tmp_path/'b'), '--out', str(table)]) == 0
    assert 'done: rows 2' in capfd.readouterr().out
    result = json.loads((table/'rows'/'row02'/'result.json').read_text())
    assert result['metrics']['dev']['mAP'] > 0
    (replaced,) = (table/'replaced').iterdir()   # the failed run, set aside
    assert json.loads((replaced/'manifest.json').read_text())['status'] == 'failed'
    caches = sorted(p.name for p in (table/'data').glob('cache-train-*'))
    assert len(caches) == 2   # one per images folder: the corrected data never met the first cache

    # the training CSV edited in place (labels flipped): the finished row is not skipped, it trains on the new labels
    csv = tmp_path/'b'/'CXRLT_2026_training.csv'
    df = pd.read_csv(csv)
    df[CLASSES[2]] = 1 - df[CLASSES[2]]
    df.to_csv(csv, index=False)
    capfd.readouterr()
    assert main(['table', '--preset', 'smoke', '--rows', '2', '--data', str(tmp_path/'b'), '--out', str(table)]) == 0
    assert 'done: rows 2' in capfd.readouterr().out
    assert len(list((table/'replaced').iterdir())) == 2   # the run on the old labels, set aside
