"The image cache as users run it: PadChest-size PNGs, DICOMs, kill -9 and resume, the CLI, DataLoaders."
import os, shutil, signal, subprocess, sys, textwrap, time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cxrlt.cache as cc
import cxrlt.cli
import cxrlt.datasets as cd
import cxrlt.images as ci


def synthetic_cxr(h, w, seed):
    "A 16-bit image with smooth structure and noise (compresses like a radiograph, unlike pure noise)."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    body = 30000 + 12000 * np.sin(xx / (w / 3) + seed) * np.cos(yy / (h / 2.5))
    return np.clip(body + rng.normal(0, 600, (h, w)), 0, 65535).astype(np.uint16)


def reference_row(a, size, aspect='pad', low=0.5, high=99.5):
    "The documented pipeline written independently in float64: numpy percentiles, torch antialiased resize."
    lo, hi = np.percentile(a.astype(np.float64), [low, high])
    x = np.clip((a - lo) / (hi - lo), 0, 1)
    h, w = a.shape
    scale = size / (max(h, w) if aspect == 'pad' else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if aspect == 'crop': nh, nw = max(nh, size), max(nw, size)
    r = F.interpolate(torch.from_numpy(x)[None, None], size=(nh, nw), mode='bilinear', antialias=True)[0, 0].numpy()
    if aspect == 'crop':
        top, left = (nh - size) // 2, (nw - size) // 2
        out = r[top:top + size, left:left + size]
    else:
        out = np.zeros((size, size))
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top:top + nh, left:left + nw] = r
    return np.rint(np.clip(out, 0, 1) * 255)


def assert_close_to_reference(row, a, size, aspect='pad'):
    diff = np.abs(row.astype(np.int64) - reference_row(a, size, aspect))
    assert diff.max() <= 1, f'cache row differs from the float64 reference by up to {diff.max()} grey levels'


@pytest.fixture(scope='module')
def many_pngs(tmp_path_factory):
    "48 distinct 1024x1024 16-bit PNGs spread over PadChest-style numbered sub-folders."
    src = tmp_path_factory.mktemp('pngs')
    ids = []
    for i in range(48):
        sub = src / str(i % 4); sub.mkdir(exist_ok=True)
        name = f'{1000 + i}_img.png'
        Image.fromarray(synthetic_cxr(1024, 1024, i)).save(sub / name, compress_level=1)
        ids.append(name)
    return src, ids


def test_padchest_size_16bit_png_round_trips(tmp_path):
    a = synthetic_cxr(2048, 1900, seed=7)           # PadChest size, not square
    (tmp_path / 'src').mkdir()
    Image.fromarray(a).save(tmp_path / 'src' / 'big.png')
    assert Image.open(tmp_path / 'src' / 'big.png').mode == 'I;16'
    for size, aspect in [(512, 'pad'), (224, 'crop')]:
        out = tmp_path / f'cache{size}'
        s = cc.build_cache(['big.png'], tmp_path / 'src', out, size=size, aspect=aspect, workers=1, progress=False)
        assert (s['n_images'], s['decoded'], s['failed']) == (1, 1, 0)
        cache = cc.open_cache(out)
        assert cache.images.shape == (1, size, size) and cache.images.dtype == np.uint8
        assert_close_to_reference(cache['big.png'], a, size, aspect)
        meta = pd.read_json(out / 'cache.json', typ='series')
        got = (meta['size'], meta['aspect'], meta['windowing'], list(meta['percentiles']), meta['status'])
        assert got == (size, aspect, 'auto', [0.5, 99.5], 'complete')


def test_kill_9_then_resume_gives_identical_bytes(tmp_path, many_pngs):
    src, ids = many_pngs
    ref = cc.build_cache(ids, src, tmp_path / 'reference', size=64, workers=1, chunk_size=2, progress=False)
    assert ref['decoded'] == 48
    out = tmp_path / 'killed'
    code = textwrap.dedent(f'''
        from cxrlt.cache import build_cache
        build_cache({ids!r}, {str(src)!r}, {str(out)!r}, size=64, workers=2, chunk_size=2, progress=False)
    ''')
    proc = subprocess.Popen([sys.executable, '-c', code], start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and len(list((out / 'chunks').glob('*.json'))) < 2:
        time.sleep(0.005)
    assert proc.poll() is None, 'the build ended before it could be killed: ' + proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)                # kill -9 the build and its worker processes
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(list((out / 'chunks').glob('*.json')))
    assert 2 <= done < 24, f'{done} of 24 chunks were done when killed; the test needs an interrupted build'
    with pytest.raises(RuntimeError, match=r"not complete \(status 'building'"):
        cc.open_cache(out)

    s = cc.build_cache(ids, src, out, size=64, workers=2, chunk_size=2, progress=False)
    assert s['decoded'] == 2 * (24 - done) and s['reused'] == 2 * done, s   # only the missing chunks
    for name in ['images.npy', 'index.csv', 'failures.csv']:
        assert (out / name).read_bytes() == (tmp_path / 'reference' / name).read_bytes(), name
    again = cc.build_cache(ids, src, out, size=64, workers=2, chunk_size=2, progress=False)
    assert again['decoded'] == 0


def test_cache_rows_follow_the_csv_order(tmp_path, many_pngs):
    src, ids = many_pngs
    pick = ids[5:8][::-1]
    cc.build_cache(pick, src, tmp_path / 'c', size=48, workers=1, progress=False)
    cache = cc.open_cache(tmp_path / 'c')
    assert cache.image_ids == pick
    for row, name in enumerate(pick):
        a = np.asarray(Image.open(next(src.rglob(name))))
        assert_close_to_reference(cache.images[row], a, 48)


def test_bad_images_are_reported_with_their_reason(tmp_path):
    src = tmp_path / 'src'; src.mkdir()
    good = synthetic_cxr(90, 80, 1)
    Image.fromarray(good).save(src / 'good.png')
    (src / 'cut.png').write_bytes((src / 'good.png').read_bytes()[:400])
    (src / 'junk.png').write_bytes(b'not an image at all' * 10)
    Image.new('RGB', (20, 20)).save(src / 'colour.png')
    (src / 'scan.jpg').write_bytes(b'')
    ids = ['good.png', 'cut.png', 'junk.png', 'colour.png', 'scan.jpg', 'absent.png']
    with pytest.raises(RuntimeError, match=r'5 of 6 images could not be decoded \(max_failures=4\)') as e:
        cc.build_cache(ids, src, tmp_path / 'c', size=32, workers=1, max_failures=4, progress=False)
    assert 'cut.png' in str(e.value) and 'failures.csv' in str(e.value)
    report = pd.read_csv(tmp_path / 'c' / 'failures.csv', keep_default_na=False).set_index('ImageID')
    assert list(report.index) == ids[1:]
    assert 'truncated' in report.loc['cut.png', 'reason']
    assert 'cannot identify image file' in report.loc['junk.png', 'reason']
    assert "PNG mode 'RGB' is not greyscale" in report.loc['colour.png', 'reason']
    assert "unsupported extension '.jpg'" in report.loc['scan.jpg', 'reason']
    assert report.loc['absent.png', 'reason'].startswith("missing: no file 'absent.png'")
    assert report.loc['cut.png', 'path'] == str(src / 'cut.png')
    s = cc.build_cache(ids, src, tmp_path / 'c', size=32, workers=1, max_failures=5, progress=False)
    assert s['failed'] == 5
    cache = cc.open_cache(tmp_path / 'c')
    assert_close_to_reference(cache['good.png'], good, 32)
    assert cache.images[1:].max() == 0


def test_a_fixed_image_is_picked_up_by_the_next_run(tmp_path, many_pngs):
    src_all, ids = many_pngs
    src = tmp_path / 'src'; src.mkdir()
    for name in ids[:6]: shutil.copy(next(src_all.rglob(name)), src / name)
    (src / ids[4]).unlink()
    with pytest.raises(RuntimeError, match='1 of 6 images'):
        cc.build_cache(ids[:6], src, tmp_path / 'c', size=32, workers=1, chunk_size=2, progress=False)
    with pytest.raises(RuntimeError, match=r"status 'failed'"):
        cc.open_cache(tmp_path / 'c')
    shutil.copy(next(src_all.rglob(ids[4])), src / ids[4])
    s = cc.build_cache(ids[:6], src, tmp_path / 'c', size=32, workers=1, chunk_size=2, progress=False)
    assert (s['decoded'], s['reused'], s['failed']) == (2, 4, 0)
    assert_close_to_reference(cc.open_cache(tmp_path / 'c')[ids[4]], np.asarray(Image.open(src / ids[4])), 32)


def test_resume_refuses_other_parameters(tmp_path, many_pngs):
    src, ids = many_pngs
    cc.build_cache(ids[:2], src, tmp_path / 'c', size=32, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"windowing \(cache: 'auto', requested: 'fixed'\)"):
        cc.build_cache(ids[:2], src, tmp_path / 'c', size=32, windowing='fixed', workers=1, progress=False)
    with pytest.raises(ValueError, match='image_ids_sha256'):
        cc.build_cache(ids[:2][::-1], src, tmp_path / 'c', size=32, workers=1, progress=False)


def test_dicom_and_png_in_one_cache(tmp_path):
    from pydicom.data import get_testdata_file
    src = tmp_path / 'src'; src.mkdir()
    shutil.copy(get_testdata_file('RG1_J2KR.dcm'), src / 'rg1.dcm')
    Image.fromarray(synthetic_cxr(60, 50, 3)).save(src / 'p.png')
    cc.build_cache(['rg1.dcm', 'p.png'], src, tmp_path / 'c', size=128, workers=1, progress=False)
    x = cc.open_cache(tmp_path / 'c')['rg1.dcm'].astype(np.float64)
    # 1955 x 1841 padded to 128: rows 0..127, columns 4..123 hold the chest
    lungs = [x[32:70, 20:43].mean(), x[32:70, 86:108].mean()]
    mediastinum = x[32:108, 58:70].mean()
    assert max(lungs) + 30 < mediastinum, (lungs, mediastinum)


def test_reading_the_cache_never_decodes_an_image(tmp_path, many_pngs, monkeypatch):
    src_all, ids = many_pngs
    src = tmp_path / 'src'; src.mkdir()
    for name in ids[:4]: shutil.copy(next(src_all.rglob(name)), src / name)
    cc.build_cache(ids[:4], src, tmp_path / 'c', size=32, workers=1, progress=False)
    expected = np.load(tmp_path / 'c' / 'images.npy').copy()
    shutil.rmtree(src)

    def no_decoding(*a, **k): raise AssertionError('an image file was decoded while reading the cache')
    monkeypatch.setattr(Image, 'open', no_decoding)
    monkeypatch.setattr(ci, 'read_image', no_decoding)
    monkeypatch.setattr(ci, 'read_png', no_decoding)
    monkeypatch.setattr(cc, 'preprocess_image', no_decoding)
    ds = cd.CachedImageDataset(tmp_path / 'c', channels=1, mean=(0.0,), std=(1.0,))
    got = torch.cat([b for b in cd.cache_dataloader(ds, batch_size=3)])
    assert torch.equal(got[:, 0], torch.from_numpy(expected).float() / 255)


def test_distributed_sampler_shards_the_dataset(tmp_path, many_pngs):
    from torch.utils.data.distributed import DistributedSampler
    src, ids = many_pngs
    cc.build_cache(ids[:10], src, tmp_path / 'c', size=16, workers=1, progress=False)
    labels = np.arange(10 * 30).reshape(10, 30) % 2
    ds = cd.CachedImageDataset(tmp_path / 'c', ids[:10], labels)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        idx = list(sampler)
        loader = cd.cache_dataloader(ds, batch_size=2, sampler=sampler)
        xs, ys = zip(*loader)
        assert torch.equal(torch.cat(ys), torch.from_numpy(labels[idx]).float())
        assert torch.equal(torch.cat(xs), torch.stack([ds[i][0] for i in idx]))
        seen.append(idx)
    assert sorted(seen[0] + seen[1]) == list(range(10)) and not set(seen[0]) & set(seen[1])


def test_dataloader_with_spawned_workers(tmp_path, many_pngs):
    src, ids = many_pngs
    cc.build_cache(ids[:6], src, tmp_path / 'c', size=16, workers=1, progress=False)
    ds = cd.CachedImageDataset(tmp_path / 'c')
    serial = torch.cat(list(cd.cache_dataloader(ds, batch_size=4)))
    spawned = torch.cat(list(cd.cache_dataloader(ds, batch_size=4, num_workers=2, multiprocessing_context='spawn')))
    assert torch.equal(serial, spawned)


def test_translate_augmentation_stays_within_its_range():
    shift_only = cd.AugmentConfig(hflip=0, degrees=0, translate=0.05, scale=(1, 1), brightness=0, contrast=0)
    aug = cd.train_augmentation(shift_only)
    x = torch.zeros(1, 64, 64); x[0, 32, 32] = 1
    torch.manual_seed(0)
    shifts = []
    for _ in range(100):
        y = aug(x)[0]
        r, c = divmod(int(y.argmax()), 64)
        shifts.append(max(abs(r - 32), abs(c - 32)))
    assert max(shifts) <= 4 and max(shifts) >= 2, shifts     # 5 % of 64 px = 3.2 px


def write_challenge_csv(path, image_ids):
    table = pd.DataFrame({'ImageID': image_ids, 'StudyDate_DICOM': '20140101', 'PatientID': '3.24E+38'})
    table.to_csv(path, index=False)
    return path


def test_cache_command(tmp_path, many_pngs, monkeypatch, capsys):
    src, ids = many_pngs
    monkeypatch.setitem(cxrlt.cli.COMMANDS, 'cache', ('cxrlt.cache:cache_cli', 'build the image cache'))
    csv = write_challenge_csv(tmp_path / 'dev.csv', ids[:5])
    out = tmp_path / 'cache64'
    rc = cxrlt.cli.main(['cache', '--csv', str(csv), '--images', str(src), '--size', '64', '--out', str(out),
                         '--workers', '1'])
    assert rc == 0
    assert 'cache64: 5 images of 64x64 (5 decoded now, 0 reused, 0 failed)' in capsys.readouterr().out
    cache = cc.open_cache(out)
    assert cache.image_ids == ids[:5] and cache.params['csv'] == str(csv.resolve())
    assert_close_to_reference(cache[ids[2]], np.asarray(Image.open(next(src.rglob(ids[2])))), 64)

    bad = write_challenge_csv(tmp_path / 'bad.csv', ids[:2] + ['nowhere.png'])
    rc = cxrlt.cli.main(['cache', '--csv', str(bad), '--images', str(src), '--out', str(tmp_path / 'c2'),
                         '--size', '32', '--workers', '1'])
    err = capsys.readouterr().err
    assert rc == 1 and '1 of 3 images could not be decoded (max_failures=0)' in err and 'nowhere.png' in err

    assert cxrlt.cli.main(['cache', '--images', str(src), '--out', str(out)]) == 2
    assert '--csv required' in capsys.readouterr().err

    dup = write_challenge_csv(tmp_path / 'dup.csv', ids[:2] + ids[:1])
    assert cxrlt.cli.main(['cache', '--csv', str(dup), '--images', str(src), '--out', str(tmp_path / 'c3')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('cxrlt cache: ') and 'dup.csv' in err and err.count('\n') == 1, err
    assert not (tmp_path / 'c3').exists()

    with pytest.raises(SystemExit):
        cxrlt.cli.main(['cache', '--help'])
    usage = capsys.readouterr().out
    for option in ['--csv', '--images', '--out', '--size', '--aspect', '--windowing', '--workers', '--max_failures']:
        assert option in usage, option
