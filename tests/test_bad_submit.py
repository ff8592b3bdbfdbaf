"""`cxrlt submit` on bad input, through the real command: one line on stderr naming the problem, a non-zero exit, no
file replaced and nothing half-made. And the losses' refusal of targets other than 0 and 1."""
import hashlib, io, json, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cxrlt.cli
import cxrlt.losses as L
from cxrlt.labels import CLASSES
from cxrlt.posttrain.predictions import prediction_frame, write_predictions

TEST_IDS = [f'tst{i:04d}.png' for i in range(6)]


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "A prediction file (4 val + 6 test rows, from known log-odds), a test CSV in another order, a small code folder."
    d = tmp_path_factory.mktemp('bad_submit')
    ell = np.random.default_rng(7).normal(-1, 2, (10, 30))
    frame = prediction_frame([f'val{i}.png' for i in range(4)] + TEST_IDS, ['val'] * 4 + ['test'] * 6, ell)
    write_predictions(frame, d/'predictions.csv')
    pd.DataFrame({'ImageID': TEST_IDS[::-1], 'StudyDate_DICOM': 20200101, 'PatientID': '1.00E+30'}).to_csv(
        d/'test.csv', index=False)
    (d/'code').mkdir(); (d/'code'/'train.py').write_text('print("train")\n'); (d/'code'/'README.md').write_text('# x\n')
    return {'dir': d, 'predictions': d/'predictions.csv', 'test_csv': d/'test.csv', 'code': d/'code',
            'ell_test': ell[4:]}


def submit(*args) -> int:
    return cxrlt.cli.main(['submit', *map(str, args)])


def submit_toy(toy, out, *extra, predictions=None) -> int:
    return submit('--predictions', predictions or toy['predictions'], '--test_csv', toy['test_csv'], '--out', out,
                  '--code_dir', toy['code'], *extra)


def one_line(capsys) -> str:
    "stderr, checked to be exactly one line starting `cxrlt submit: `."
    err = capsys.readouterr().err
    assert err.startswith('cxrlt submit: ') and err.endswith('\n') and err.count('\n') == 1, repr(err)
    return err.rstrip('\n')


def snapshot(folder:Path) -> dict:
    "Every file under `folder` (hidden and temporary ones included) with its bytes."
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def sigmoid(x): return 1 / (1 + np.exp(-x))


# --- 1. the zip and its summary replace nothing they were not asked to ------------------------------------------

def test_a_good_submission_is_written_with_its_summary(toy, tmp_path, capsys):
    out = tmp_path/'submission.zip'
    assert submit_toy(toy, out) == 0
    assert capsys.readouterr().err == ''
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ['code/README.md', 'code/train.py', 'submission.csv']
        sub = pd.read_csv(z.open('submission.csv'), dtype={'ImageID': str})
    assert sub.ImageID.tolist() == TEST_IDS[::-1] and list(sub.columns) == ['ImageID'] + CLASSES
    np.testing.assert_allclose(sub[CLASSES].to_numpy(), sigmoid(toy['ell_test'][::-1]), rtol=1e-12, atol=1e-15)
    summary = json.loads((tmp_path/'submission.json').read_text())
    assert summary['zip_sha256'] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['submission.json', 'submission.zip']


FOREIGN = {
    'metrics of another tool': b'{"mAP": 0.312, "AUC": 0.88}\n',
    'not JSON at all': b'loss,epoch\n0.3,1\n',
    'a summary of another zip': None,   # filled in the test: a real summary, written for other.zip
}

@pytest.mark.parametrize('case', list(FOREIGN))
@pytest.mark.parametrize('overwrite', [False, True])
def test_the_summary_never_replaces_a_file_that_is_not_its_own(case, overwrite, toy, tmp_path, capsys):
    content = FOREIGN[case]
    if content is None:
        assert submit_toy(toy, tmp_path/'other.zip') == 0
        content = (tmp_path/'other.json').read_bytes()
        for p in tmp_path.iterdir(): p.unlink()
    (tmp_path/'metrics.json').write_bytes(content)
    before = snapshot(tmp_path)
    assert submit_toy(toy, tmp_path/'metrics.zip', *(['--overwrite'] if overwrite else [])) != 0
    err = one_line(capsys)
    assert f'{tmp_path/"metrics.json"} exists and is not a summary cxrlt submit wrote for metrics.zip' in err, err
    assert snapshot(tmp_path) == before


def test_the_prediction_files_own_json_is_not_taken_for_a_summary(toy, tmp_path, capsys):
    "`--out run/predictions.zip` beside predictions.csv would have replaced the prediction file's predictions.json."
    write_predictions(prediction_frame(TEST_IDS, 'test', toy['ell_test']), tmp_path/'predictions.csv', {'seed': 1})
    before = snapshot(tmp_path)
    assert submit_toy(toy, tmp_path/'predictions.zip', predictions=tmp_path/'predictions.csv') != 0
    assert 'predictions.json exists and is not a summary' in one_line(capsys)
    assert snapshot(tmp_path) == before


def test_an_existing_zip_is_replaced_only_when_asked(toy, tmp_path, capsys):
    out = tmp_path/'submission.zip'
    assert submit_toy(toy, out) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert submit_toy(toy, out) != 0
    err = one_line(capsys)
    assert f'{out} already exists (an earlier submission?) — pass --overwrite' in err, err
    assert snapshot(tmp_path) == before
    # asked: a submission from other predictions replaces both files, and the summary describes the new zip
    other = tmp_path/'other'/'predictions.csv'
    write_predictions(prediction_frame(TEST_IDS, 'test', -toy['ell_test']), other)
    assert submit_toy(toy, out, '--overwrite', predictions=other) == 0
    with zipfile.ZipFile(out) as z: sub = pd.read_csv(z.open('submission.csv'), dtype={'ImageID': str})
    np.testing.assert_allclose(sub[CLASSES].to_numpy(), sigmoid(-toy['ell_test'][::-1]), rtol=1e-12, atol=1e-15)
    summary = json.loads((tmp_path/'submission.json').read_text())
    assert summary['zip_sha256'] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert summary['predictions'] == str(other)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


def test_an_out_that_is_a_folder_or_an_input_is_refused(toy, tmp_path, capsys):
    (tmp_path/'sub.zip').mkdir()
    assert submit_toy(toy, tmp_path/'sub.zip', '--overwrite') != 0
    assert f'out {tmp_path/"sub.zip"} is a folder — expected the path of the .zip file to write' in one_line(capsys)
    zipped = tmp_path/'preds.zip'
    zipped.write_bytes(toy['predictions'].read_bytes())
    assert submit_toy(toy, zipped, '--overwrite', predictions=zipped) != 0
    assert 'is one of the input files' in one_line(capsys)
    assert zipped.read_bytes() == toy['predictions'].read_bytes()


# --- 2. a code folder holding data is refused ----------------------------------------------------------------

DICOM_HEAD = b'\0' * 128 + b'DICM'
DATA_FILES = {'images/a.png': b'\x89PNG\r\n\x1a\n', 'b.jpg': b'\xff\xd8\xff', 'c.JPEG': b'x', 'd.dcm': DICOM_HEAD,
              'e.dicom': DICOM_HEAD, 'f.npy': b'\x93NUMPY', 'g.npz': b'PK\x03\x04', 'h.pt': b'PK\x03\x04',
              'i.pth': b'x', 'j.ckpt': b'x', 'k.safetensors': b'x', 'labels.csv': b'ImageID,Mass\na.png,1\n',
              'm.parquet': b'PAR1', 'n.zip': b'PK\x03\x04', 'scan_without_extension': DICOM_HEAD,
              'png_without_extension': b'\x89PNG\r\n\x1a\n'}

@pytest.mark.parametrize('name', list(DATA_FILES))
def test_a_code_folder_with_a_data_file_is_refused(name, toy, tmp_path, capsys):
    code = tmp_path/'code'
    (code/name).parent.mkdir(parents=True)
    (code/'train.py').write_text('print(1)\n'); (code/name).write_bytes(DATA_FILES[name])
    out = tmp_path/'out'/'submission.zip'
    assert submit('--predictions', toy['predictions'], '--test_csv', toy['test_csv'], '--out', out,
                  '--code_dir', code) != 0
    err = one_line(capsys)
    assert f'code_dir {code} holds 1 data file ({name}) — a code folder holds the sources that made the submission' \
        in err, err
    assert not (tmp_path/'out').exists()


def test_a_data_folder_passed_as_code_is_refused_naming_the_first_files(toy, tmp_path, capsys):
    data = tmp_path/'data'
    (data/'images').mkdir(parents=True)
    for i in range(5): (data/'images'/f'img{i}.png').write_bytes(b'\x89PNG\r\n\x1a\n')
    (data/'train.csv').write_text('ImageID\nimg0.png\n'); (data/'prepare.py').write_text('print(1)\n')
    assert submit('--predictions', toy['predictions'], '--test_csv', toy['test_csv'], '--out', tmp_path/'s.zip',
                  '--code_dir', data) != 0
    err = one_line(capsys)
    assert 'holds 6 data files (images/img0.png, images/img1.png, images/img2.png and 3 more)' in err, err
    assert 'move images, DICOMs, arrays, checkpoints, tables and archives out of it' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']


# --- 3. a bad prediction file is named with what was expected --------------------------------------------------

def _text(toy) -> str: return toy['predictions'].read_text()

def _frame(toy) -> pd.DataFrame:
    return pd.read_csv(toy['predictions'], dtype=str, keep_default_na=False)

def _zipped(toy) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z: z.write(toy['predictions'], 'predictions.csv')
    return buf.getvalue()

def _first_test_row(f) -> int: return int(np.flatnonzero((f.split == 'test').to_numpy())[0])

def _cell(column, value):
    def edit(toy):
        f = _frame(toy); f.loc[_first_test_row(f), column] = value
        return f.to_csv(index=False).encode()
    return edit

BAD_PREDICTIONS = {   # name: (the file's bytes from the good one, what the message must say)
    'latin-1': (lambda toy: _text(toy).replace('tst0003', 'tst\xe9003').encode('latin-1'),
                'byte 0xe9 on line 9 is not UTF-8 text — expected the prediction file as a UTF-8 CSV file'),
    'UTF-16': (lambda toy: _text(toy).encode('utf-16'), 'byte 0xff on line 1 is not UTF-8 text (the file is UTF-16'),
    'a zip named .csv': (lambda toy: _zipped(toy), 'is not UTF-8 text (the file is a zip archive'),
    'a ragged row': (lambda toy: _text(toy).replace('\ntst0000.png,test,', '\ntst0000.png,test,0.5,', 1).encode(),
                     'not a readable CSV file: Expected 62 fields in line 6, saw 63'),
    'a class column missing': (lambda toy: _frame(toy).drop(columns='Kyphosis').to_csv(index=False).encode(),
                               "wrong columns: 29 of the 30 probability columns; missing ['Kyphosis']"),
    'NaN': (_cell('Mass', 'nan'), "column 'Mass' holds 'nan', which is not a finite number on line 6"),
    'an empty cell': (_cell('Mass', ''), "column 'Mass' holds an empty cell on line 6"),
    'above 1': (_cell('Normal', '1.5'), "column 'Normal' holds 1.5 on line 6 (ImageID 'tst0000.png')"),
    'below 0': (_cell('Hernia', '-0.2'), "column 'Hernia' holds -0.2 on line 6"),
    'an ImageID twice': (lambda toy: (_text(toy) + _text(toy).splitlines()[5] + '\n').encode(),
                         "ImageID 'tst0000.png' appears on lines 6, 12 in split 'test'"),
    'no test rows': (lambda toy: (''.join(_text(toy).splitlines(True)[:5])).encode(),
                     "has no rows with split 'test'; predict the test images first"),
    'a header only': (lambda toy: (','.join(['ImageID'] + CLASSES) + '\n').encode(),
                      'has no prediction rows — expected one row per test image'),
}

@pytest.mark.parametrize('case', list(BAD_PREDICTIONS))
def test_a_bad_prediction_file_is_refused_naming_it(case, toy, tmp_path, capsys):
    make, expected = BAD_PREDICTIONS[case]
    bad = tmp_path/'bad predictions.csv'
    bad.write_bytes(make(toy))
    out = tmp_path/'out'/'submission.zip'
    assert submit_toy(toy, out, predictions=bad) != 0
    err = one_line(capsys)
    assert str(bad) in err and expected in err, err
    assert not (tmp_path/'out').exists()


def test_a_missing_or_folder_prediction_file_is_refused(toy, tmp_path, capsys):
    assert submit_toy(toy, tmp_path/'s.zip', predictions=tmp_path/'none.csv') != 0
    assert f'prediction file {tmp_path/"none.csv"} does not exist' in one_line(capsys)
    assert submit_toy(toy, tmp_path/'s.zip', predictions=tmp_path) != 0
    assert f'prediction file {tmp_path} is a folder — expected a CSV file' in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


# --- 4. losses take 0/1 targets only ---------------------------------------------------------------------------

COUNTS, N_IMAGES = [10, 100, 1000, 3], 2000

def every_loss():
    "Every registered loss class as `make_loss` builds it, DRW-wrapped ones included, and the functional `bce`."
    for name in L.LOSSES:
        cls = L.loss_class(name)
        yield name, cls.__name__, L.make_loss(name, COUNTS, n_images=N_IMAGES,
                                              drw_start_epoch=0 if cls.deferred_reweighting else None)
    yield 'bce+drw', 'BCELoss', L.make_loss('bce', COUNTS, drw_start_epoch=0)
    yield 'bce()', 'BCELoss', L.bce

LOSS_CASES = list(every_loss())

@pytest.mark.parametrize('value,shown', [(2.0, '2.0'), (-1.0, '-1.0'), (float('nan'), 'nan'), (0.9, '0.9'),
                                         (1e-7, '1e-07')])
@pytest.mark.parametrize('name,cls,loss', LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_every_loss_refuses_targets_other_than_0_and_1(name, cls, loss, value, shown):
    z = torch.zeros(3, 4, requires_grad=True)
    y = torch.zeros(3, 4); y[0, 0] = 1; y[2, 1] = value
    with pytest.raises(ValueError) as e: loss(z, y)
    assert str(e.value).startswith(f'{cls}: target {shown} at row 2, class 1 is not 0 or 1 (1 of 12 targets) — ')
    assert 'hard 0/1 labels' in str(e.value) and '\n' not in str(e.value)
    assert L._PENDING_TARGET_CHECKS == []


@pytest.mark.parametrize('name,cls,loss', LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_hard_targets_of_any_dtype_give_the_same_loss(name, cls, loss):
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(5, 4, generator=g), (torch.rand(5, 4, generator=g) < 0.4)
    ref = loss(z, y.float())
    for t in (y, y.long(), y.double()): torch.testing.assert_close(loss(z, t), ref, rtol=0, atol=0)


def test_the_deferred_check_raises_at_a_later_call_and_is_cleared():
    "The path CUDA targets take, run on the CPU: queued, raised at the next call of any loss, then forgotten."
    y = torch.ones(2, 30); y[1, 29] = 3
    L._defer_target_check(y, 'AsymmetricLoss')
    L._defer_target_check(torch.zeros(2, 30), 'AsymmetricLoss')
    with pytest.raises(ValueError, match=r"^AsymmetricLoss: target 3\.0 at row 1, class 29 \('calcified densities'\) "
                                         r"of an earlier batch on cpu is not 0 or 1 \(1 of 60 targets\)"):
        L.BCELoss()(torch.zeros(1, 30), torch.zeros(1, 30))
    assert L._PENDING_TARGET_CHECKS == []
    L._defer_target_check(torch.zeros(2, 30), 'BCELoss'); L.finish_target_checks()
    assert L._PENDING_TARGET_CHECKS == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_on_cuda_the_check_adds_no_synchronisation():
    loss = L.make_loss('asl').cuda()
    z, y = torch.zeros(64, 30, device='cuda'), torch.zeros(64, 30, device='cuda')
    y[9, 4] = 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')   # any synchronising call in the loss raises
    try: loss(z, torch.zeros_like(y)); loss(z, y)
    finally: torch.cuda.set_sync_debug_mode('default')
    with pytest.raises(ValueError, match=r"AsymmetricLoss: target 2\.0 at row 9, class 4 \('Nodule'\) of an earlier "
                                         r"batch on cuda:0"):
        L.finish_target_checks()
