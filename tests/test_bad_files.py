"""Bad files and bad arguments as users meet them, through the real commands (`cxrlt.cli.main`): one line on
stderr, `cxrlt <command>: ...`, a non-zero exit code, nothing overwritten and no half-made output folder;
and pool workers that end with a parent killed by SIGKILL."""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import cxrlt.cache as cc
import cxrlt.cli
from cxrlt.data import (ChallengeFileError, read_image_ids, read_padchest_master, read_removal_csv, read_test_csv,
                        read_training_csv)
from cxrlt.labels import CLASSES

ID_COLUMNS = ['ImageID', 'StudyDate_DICOM', 'PatientID']
CLI = [sys.executable, '-c', 'import sys; from cxrlt.cli import main; sys.exit(main(sys.argv[1:]))']


def cli(capsys, command, *args):
    "Run `cxrlt command args` in this process: its exit code and what it wrote on stderr."
    capsys.readouterr()
    rc = cxrlt.cli.main([command, *map(str, args)])
    return rc, capsys.readouterr().err


def one_line(rc, err, command, *fragments, progress:str=None) -> str:
    "The single stderr line of a refused command (less `progress` bars), after checking its exit code and text."
    assert rc != 0, f'cxrlt {command} did not fail'
    lines = [ln for ln in err.replace('\r', '\n').splitlines() if ln and not (progress and ln.startswith(progress))]
    assert len(lines) == 1, f'expected one line on stderr, got {len(lines)}:\n{err}'
    assert lines[0].startswith(f'cxrlt {command}: '), lines[0]
    for f in fragments: assert f in lines[0], f'{f!r} not in {lines[0]!r}'
    return lines[0]


def radiograph(h=64, w=56, seed=0):
    "A 16-bit image with smooth structure and noise."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    body = 30000 + 12000 * np.sin(xx / (w / 3) + seed) * np.cos(yy / (h / 2.5))
    return np.clip(body + rng.normal(0, 600, (h, w)), 0, 65535).astype(np.uint16)


def image_csv(path, image_ids):
    "A label-less challenge CSV listing `image_ids`."
    table = pd.DataFrame({'ImageID': image_ids, 'StudyDate_DICOM': '20140101', 'PatientID': '3.24E+38'})
    table.to_csv(path, index=False)
    return path


@pytest.fixture
def images(tmp_path):
    "A folder of four good 16-bit PNGs, and a CSV listing them."
    src = tmp_path/'images'; src.mkdir()
    ids = [f'im{i}.png' for i in range(4)]
    for i, v in enumerate(ids): Image.fromarray(radiograph(seed=i)).save(src/v)
    return src, ids, image_csv(tmp_path/'ids.csv', ids)


def snapshot(folder: Path) -> dict:
    "Every file below `folder` with its bytes and modification time."
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob('*')) if p.is_file()}


# --- 1. CSVs --------------------------------------------------------------------------------------------------

def training_csv(path, rows=()):
    "A training CSV with the challenge's header and `rows` of ImageIDs (all labels 0)."
    lines = [','.join(ID_COLUMNS + CLASSES)] + [','.join([v, '20140101', '3.24E+38'] + ['0'] * 30) for v in rows]
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_training_csv_with_only_a_header_lists_no_image(tmp_path, capsys):
    train = training_csv(tmp_path/'train.csv')
    rc, err = cli(capsys, 'train', f'train_csv={train}', f'train_cache={tmp_path/"cache"}',
                  f'out_dir={tmp_path/"runs"}')
    one_line(rc, err, 'train', f'{train}: the header is the only line: the training CSV lists no image')


def test_empty_removal_csv_removes_nothing(tmp_path, capsys):
    for text in ['', 'ImageID,StudyDate_DICOM,PatientID', 'ImageID,StudyDate_DICOM,PatientID\n']:
        (tmp_path/'Removal.csv').write_text(text)
        assert read_removal_csv(tmp_path/'Removal.csv') == []
    # the training command accepts it: its refusal names only the missing cache, not Removal.csv
    train = training_csv(tmp_path/'train.csv', ['a.png', 'b.png'])
    rc, err = cli(capsys, 'train', f'train_csv={train}', f'removal_csv={tmp_path/"Removal.csv"}',
                  f'train_cache={tmp_path/"nocache"}', f'out_dir={tmp_path/"runs"}')
    line = one_line(rc, err, 'train', 'nocache')
    assert 'Removal.csv' not in line and 'train.csv' not in line, line


BAD_TEXT = {'latin-1': lambda text: text.replace('b.png', 'radiografía_b.png').encode('latin-1'),
            'cp1252': lambda text: text.replace('b.png', 'b–1.png').encode('cp1252'),
            'binary': lambda text: b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4,
            'utf-16': lambda text: text.encode('utf-16')}


@pytest.mark.parametrize('encoding', list(BAD_TEXT))
@pytest.mark.parametrize('reader', [read_training_csv, read_test_csv, read_removal_csv, read_image_ids,
                                    read_padchest_master])
def test_csv_that_is_not_utf8_is_one_message_naming_the_file(tmp_path, reader, encoding):
    if reader is read_training_csv: text = training_csv(tmp_path/'x', ['a.png', 'b.png']).read_text()
    elif reader is read_padchest_master: text = 'ImageID,StudyID,PatientID,PatientBirth,PatientSex_DICOM,' \
        'Projection,StudyDate_DICOM,Labels\na.png,1,2,1950,M,PA,20140101,[]\nb.png,1,2,1950,M,PA,20140101,[]\n'
    else: text = 'ImageID,StudyDate_DICOM,PatientID\na.png,20140101,3.24E+38\nb.png,20140101,3.24E+38\n'
    path = tmp_path/f'{encoding}.csv'
    path.write_bytes(BAD_TEXT[encoding](text))
    with pytest.raises(ChallengeFileError) as e: reader(path)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'{path}: ') and 'expected the' in msg and 'UTF-8 CSV file' in msg, msg
    if encoding in ('latin-1', 'cp1252'): assert 'on line 3 is not UTF-8 text' in msg, msg


def test_cache_command_refuses_bad_csvs_before_making_anything(tmp_path, images, capsys):
    src, ids, _ = images
    out = tmp_path/'cache'
    (tmp_path/'header.csv').write_text('ImageID,StudyDate_DICOM,PatientID\n')
    (tmp_path/'latin1.csv').write_bytes('ImageID\nim0.png\nniño.png\n'.encode('latin-1'))
    (tmp_path/'binary.csv').write_bytes(bytes(range(256)))
    (tmp_path/'empty.csv').write_text('')
    cases = {'header.csv': 'the header is the only line: the CSV lists no image',
             'latin1.csv': 'byte 0xf1 on line 3 is not UTF-8 text — expected the CSV as a UTF-8 CSV file',
             'binary.csv': 'holds NUL bytes (a binary file, or UTF-16 text) — expected the CSV as a UTF-8 CSV file',
             'empty.csv': 'the file is empty — expected a header line and one line per image',
             'missing.csv': 'missing.csv does not exist'}
    for name, problem in cases.items():
        rc, err = cli(capsys, 'cache', '--csv', tmp_path/name, '--images', src, '--out', out, '--workers', 1)
        one_line(rc, err, 'cache', str(tmp_path/name), problem)
        assert not out.exists(), name


# --- 2. images ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('outside', ['../secret.png', '../../secret.png', 'sub/../../secret.png', 'ABSOLUTE'])
def test_image_id_outside_the_images_folder_is_refused(tmp_path, images, capsys, outside):
    src, ids, _ = images
    Image.fromarray(radiograph()).save(tmp_path/'secret.png')       # a readable image, beside the folder
    outside = str(tmp_path/'secret.png') if outside == 'ABSOLUTE' else outside
    csv = image_csv(tmp_path/'evil.csv', ids + [outside])
    rc, err = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', tmp_path/'cache', '--workers', 1,
                  '--max_failures', 5)
    one_line(rc, err, 'cache', f'ImageID {outside!r} points outside the images folder {src}',
             'expected a file name or a path below that folder')
    assert not (tmp_path/'cache').exists()


def test_tiny_constant_and_truncated_images_are_recorded_failures(tmp_path, images, capsys):
    src, ids, _ = images
    Image.fromarray(np.array([[40000]], np.uint16)).save(src/'dot.png')                # 1x1
    Image.fromarray(radiograph(16, 200)).save(src/'strip.png')                         # 16 px high
    Image.fromarray(np.full((64, 64), 1234, np.uint16)).save(src/'flat.png')           # one value
    uncr = Path(get_testdata_file('RG1_UNCR.dcm')).read_bytes()
    (src/'cut.dcm').write_bytes(uncr[:len(uncr) // 2])                                 # truncated DICOM
    bad = ['dot.png', 'strip.png', 'flat.png', 'cut.dcm']
    csv = image_csv(tmp_path/'all.csv', ids + bad)
    out = tmp_path/'cache'
    rc, err = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', out, '--size', 32, '--workers', 1)
    one_line(rc, err, 'cache', '4 of 8 images could not be decoded (max_failures=0)', 'dot.png: ValueError: ',
             progress='cache 32px:')
    rc, _ = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', out, '--size', 32, '--workers', 1,
                '--max_failures', 4)
    assert rc == 0
    cache = cc.open_cache(out)
    reasons = cache.failures.set_index('ImageID')['reason']
    assert cache.failed_ids == bad
    assert reasons['dot.png'] == (f'ValueError: {src/"dot.png"}: 1x1 pixels is too small for a radiograph '
                                  '— expected at least 32 pixels on the shorter side')
    assert reasons['strip.png'].startswith(f'ValueError: {src/"strip.png"}: 200x16 pixels is too small')
    assert reasons['flat.png'] == (f"ValueError: {src/'flat.png'}: every pixel is grey level 0 of 255 after 'auto' "
                                   'windowing (a blank or constant image) — expected a radiograph with contrast')
    assert reasons['cut.dcm'].startswith(f'ValueError: {src/"cut.dcm"}: cannot decode it (ValueError: The number of '
                                         'bytes of pixel data is less than expected (3598420 vs 7198310 bytes)')
    assert reasons['cut.dcm'].endswith('— expected a complete single-frame greyscale DICOM file')
    assert all(cache[v].max() > 0 for v in ids)              # the good images are pictures, the bad ones are out
    assert all('\n' not in r for r in reasons)


# --- 3. caches ------------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, images):
    "A complete 32 px cache of the four images."
    src, ids, csv = images
    cc.build_cache(ids, src, tmp_path/'cache', size=32, workers=1, csv=csv, progress=False)
    return tmp_path/'cache'


@pytest.mark.parametrize('name', ['cache.json', 'images.npy', 'index.csv'])
def test_truncated_cache_file_names_the_file_and_the_fix(cache, images, capsys, name):
    src, ids, csv = images
    data = (cache/name).read_bytes()
    (cache/name).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as e: cc.open_cache(cache)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'{cache/name}: '), msg
    assert f'delete {cache} and rebuild it with `cxrlt cache`' in msg, msg
    before = snapshot(cache)
    rc, err = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', cache, '--size', 32, '--workers', 1)
    one_line(rc, err, 'cache', f'{cache/name}: ', 'rebuild it with `cxrlt cache`')
    assert snapshot(cache) == before                          # refused: nothing decoded into it, nothing rewritten


def test_complete_cache_is_reused_only_with_the_same_parameters(tmp_path, cache, images, capsys, monkeypatch):
    src, ids, csv = images
    before = snapshot(cache)
    other = tmp_path/'other_images'; shutil.copytree(src, other)
    rc, err = cli(capsys, 'cache', '--csv', csv, '--images', other, '--out', cache, '--size', 32, '--workers', 1)
    one_line(rc, err, 'cache', f'the complete cache in {cache} was built with other parameters',
             f"images_dir (cache: {str(src.resolve())!r}, requested: {str(other.resolve())!r})")
    for args, what in [(['--size', 64], 'size (cache: 32, requested: 64)'),
                       (['--size', 32, '--windowing', 'fixed'], "windowing (cache: 'auto', requested: 'fixed')")]:
        rc, err = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', cache, '--workers', 1, *args)
        one_line(rc, err, 'cache', what)
    rc, err = cli(capsys, 'cache', '--csv', image_csv(tmp_path/'fewer.csv', ids[:3]), '--images', src, '--out', cache,
                  '--size', 32, '--workers', 1)
    one_line(rc, err, 'cache', 'n_images (cache: 4, requested: 3)', 'image_ids_sha256')
    assert snapshot(cache) == before
    # the same parameters: returns at once, decodes nothing, writes nothing, needs no image folder
    def no_decoding(*a, **k): raise AssertionError('an image was decoded')
    monkeypatch.setattr(cc, 'preprocess_image', no_decoding)
    shutil.rmtree(src)
    t0 = time.perf_counter()
    s = cc.build_cache(ids, src, cache, size=32, workers=1, csv=csv, progress=False)
    assert (s['decoded'], s['reused'], s['failed']) == (0, 4, 0) and time.perf_counter() - t0 < 1, s
    assert snapshot(cache) == before


def test_cache_command_checks_arguments_before_making_a_folder(tmp_path, images, capsys):
    src, ids, csv = images
    out, others = tmp_path/'cache', tmp_path/'other_images'
    others.mkdir(); Image.fromarray(radiograph()).save(others/'someone_else.png')
    cases = [(['--images', src, '--size', 4], 'size must be an integer in [8, 8192], got 4'),
             (['--images', src, '--aspect', 'stretch'], "aspect must be one of ['pad', 'crop'], got 'stretch'"),
             (['--images', src, '--low', 50, '--high', 10], 'need 0 <= low < high <= 100'),
             (['--images', tmp_path/'nowhere'], f'images folder {tmp_path/"nowhere"} does not exist'),
             (['--images', others], f"none of the 4 ImageIDs has a file in the images folder {others} or its sub-"
                                    "folders (e.g. 'im0.png') — expected the folder that holds the listed images")]
    for args, problem in cases:
        rc, err = cli(capsys, 'cache', '--csv', csv, '--out', out, '--workers', 1, *args)
        one_line(rc, err, 'cache', problem)
        assert not out.exists(), args
    (tmp_path/'a_file').write_text('mine')
    rc, err = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', tmp_path/'a_file', '--workers', 1)
    one_line(rc, err, 'cache', f'{tmp_path/"a_file"} is a file')
    rc, err = cli(capsys, 'cache', '--csv', csv, '--images', src, '--out', src, '--workers', 1)   # the images folder
    one_line(rc, err, 'cache', f"{src} holds 'im0.png' (and 3 more) but no cache.json")
    assert (tmp_path/'a_file').read_text() == 'mine' and sorted(p.name for p in src.iterdir()) == ids


# --- 5. cxrlt synth -------------------------------------------------------------------------------------------

def test_synth_command_checks_arguments_before_making_a_folder(tmp_path, capsys):
    out = tmp_path/'synth'
    cases = [(['--size', 8], 'size must be an integer from 32 to 4096 pixels, got 8'),
             (['--size', 10000], 'got 10000'),
             (['--n', 1], 'n must be an integer >= 2, got 1'),
             (['--seed', -1], 'seed must be an integer >= 0, got -1'),
             (['--workers', -2], 'workers must be an integer >= 0'),
             (['--preset', 'huge'], "preset must be one of ['tiny', 'demo'], got 'huge'")]
    for args, problem in cases:
        rc, err = cli(capsys, 'synth', '--out', out, *args)
        one_line(rc, err, 'synth', problem)
        assert not out.exists(), args
    (tmp_path/'a_file').write_text('mine')
    one_line(*cli(capsys, 'synth', '--out', tmp_path/'a_file'), 'synth', f'{tmp_path/"a_file"} is a file')
    assert (tmp_path/'a_file').read_text() == 'mine'


def test_synth_command_leaves_another_dataset_alone(tmp_path, capsys):
    from cxrlt.synth import MANIFEST_JSON
    out = tmp_path/'synth'; out.mkdir()
    (out/MANIFEST_JSON).write_text('{"params": {"generator": "cxrlt.synth", "n": 80}, "status": "complete"}')
    (out/'notes.txt').write_text('mine')
    before = snapshot(out)
    one_line(*cli(capsys, 'synth', '--out', out), 'synth', 'holds a synthetic dataset made with other parameters')
    (out/MANIFEST_JSON).write_text('{"params": {"gener')                    # cut short
    before = snapshot(out)
    one_line(*cli(capsys, 'synth', '--out', out), 'synth', f'{out/MANIFEST_JSON}: not valid JSON')
    assert snapshot(out) == before


# --- 4. orphaned workers --------------------------------------------------------------------------------------

def workers_of(proc, at_least:int, progress, timeout:float=60) -> list:
    "The child processes of `proc` once it has `at_least` of them and `progress()` is true (it must still run)."
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, 'the command ended before it could be killed: ' + proc.stderr.read().decode()
        children = psutil.Process(proc.pid).children(recursive=True)
        if len(children) >= at_least and progress(): return children
        time.sleep(0.02)
    raise AssertionError(f'no {at_least} busy workers within {timeout} s')


def assert_all_end(children, timeout:float=10):
    "Every process of `children` ends (or is a zombie waiting for init) within `timeout` seconds."
    deadline = time.time() + timeout
    alive = children
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    names = [' '.join(p.cmdline()[:3]) for p in alive]
    for p in alive: p.kill()                                   # leave no orphan behind, even when failing
    assert not alive, f'{len(alive)} process(es) outlived their killed parent: {names}'


def kill_parent_and_check(proc, children):
    proc.send_signal(signal.SIGKILL)                           # the parent only, not its process group
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert_all_end(children)


def test_cache_workers_end_when_the_command_is_killed(tmp_path):
    src = tmp_path/'images'; src.mkdir()
    Image.fromarray(radiograph(2000, 1800)).save(src/'big.png', compress_level=1)
    ids = [f'im{i:03d}.png' for i in range(40)]
    for v in ids: os.link(src/'big.png', src/v)                # 40 names, one PadChest-size file: slow to decode
    csv = image_csv(tmp_path/'ids.csv', ids)
    out = tmp_path/'cache'
    args = ['cache', '--csv', csv, '--images', src, '--out', out, '--size', 64, '--workers', 2, '--chunk_size', 1]
    proc = subprocess.Popen(CLI + list(map(str, args)), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        children = workers_of(proc, 2, lambda: len(list((out/'chunks').glob('*.json'))) >= 1)
        kill_parent_and_check(proc, children)
    finally:
        if proc.poll() is None: proc.kill()
    assert len(list((out/'chunks').glob('*.json'))) < 40, 'the build was not interrupted'


def test_synth_workers_end_when_the_command_is_killed(tmp_path):
    out = tmp_path/'synth'
    proc = subprocess.Popen(CLI + ['synth', '--preset', 'tiny', '--out', str(out), '--workers', '2'],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        children = workers_of(proc, 2, lambda: len(list((out/'images').rglob('*.png'))) >= 8)
        kill_parent_and_check(proc, children)
    finally:
        if proc.poll() is None: proc.kill()
    assert len(list((out/'images').rglob('*.*'))) < 300, 'the build was not interrupted'
