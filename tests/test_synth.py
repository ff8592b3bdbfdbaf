"The synthetic CXR-LT look-alike, built as users build it: through the command line, read back by the data module."
import filecmp, json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

import cxrlt.cli
from cxrlt.labels import CLASSES
from cxrlt import synth
from cxrlt.data import IMAGES_DIR, REMOVAL_CSV, TEST_CSV, TEST_LABELS_CSV, TRAINING_CSV
from cxrlt.synth import (COUNTS_CSV, MANIFEST_JSON, SIGNS_CSV, SYNTH_PRESETS, make_synthetic_cxrlt, read_padchest,
                         render_radiograph, sample_padchest, write_dicom, write_png16)
from cxrlt.synth.signs import _SIGNS


@pytest.fixture(scope='module')
def padchest():
    return read_padchest()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "`cxrlt synth --preset tiny` run twice with one seed, through the CLI entry point."
    root = tmp_path_factory.mktemp('synth')
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(cxrlt.cli.COMMANDS, 'synth', ('cxrlt.synth:synth_cli', 'the synthetic CXR-LT look-alike'))
        for name in ('a', 'b'):
            assert cxrlt.cli.main(['synth', '--preset', 'tiny', '--out', str(root/name), '--seed', '5']) == 0
    return root/'a', root/'b'


def _files(d: Path) -> list:
    return sorted(p.relative_to(d) for p in d.rglob('*') if p.is_file())


def test_same_seed_gives_identical_bytes(tiny):
    a, b = tiny
    files = _files(a)
    assert files == _files(b)
    assert len([f for f in files if f.parts[0] == IMAGES_DIR]) == SYNTH_PRESETS['tiny']['n']
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_worker_count_and_seed(tmp_path, padchest):
    "One process gives the bytes that a pool gives; another seed gives other images."
    kw = dict(n=80, size=48, min_positives=1, min_test_positives=0, min_removal=0, n_dicom=1, padchest=padchest,
              progress=False)
    make_synthetic_cxrlt(tmp_path/'one', workers=1, seed=2, **kw)
    make_synthetic_cxrlt(tmp_path/'two', workers=2, seed=2, **kw)
    make_synthetic_cxrlt(tmp_path/'other', workers=2, seed=3, **kw)
    files = [str(f) for f in _files(tmp_path/'one')]
    assert filecmp.cmpfiles(tmp_path/'one', tmp_path/'two', files, shallow=False)[1:] == ([], [])
    assert (tmp_path/'one'/TRAINING_CSV).read_bytes() != (tmp_path/'other'/TRAINING_CSV).read_bytes()


def test_files_are_the_challenges(tiny):
    a, _ = tiny
    head = ['ImageID', 'StudyDate_DICOM', 'PatientID']
    train = pd.read_csv(a/TRAINING_CSV, dtype=str)
    assert list(train.columns) == head + CLASSES
    assert list(pd.read_csv(a/TEST_CSV, dtype=str).columns) == head
    assert list(pd.read_csv(a/TEST_LABELS_CSV, dtype=str).columns) == head + CLASSES
    assert list(pd.read_csv(a/REMOVAL_CSV, dtype=str).columns) == ['ImageID']
    assert train['PatientID'].str.fullmatch(r'\d\.\d{2}E\+\d{2}').all()
    assert set(train[CLASSES].to_numpy().ravel()) <= {'0', '1'}
    manifest = json.loads((a/MANIFEST_JSON).read_text())
    assert manifest['status'] == 'complete' and manifest['params']['seed'] == 5
    counts = pd.read_csv(a/COUNTS_CSV)
    assert counts['padchest_images'].tolist()[CLASSES.index('Hydropneumothorax')] == 48
    assert (counts['training'] >= SYNTH_PRESETS['tiny']['min_positives']).all()


def test_pngs_are_16_bit_and_dicoms_read(tiny):
    import pydicom
    a, _ = tiny
    pngs, dcms = sorted((a/IMAGES_DIR).rglob('*.png')), sorted((a/IMAGES_DIR).rglob('*.dcm'))
    assert len(dcms) == SYNTH_PRESETS['tiny']['n_dicom'] and len(pngs) == SYNTH_PRESETS['tiny']['n'] - len(dcms)
    for p in pngs[:20]:
        im = Image.open(p)
        assert im.mode == 'I;16' and im.size[1] == SYNTH_PRESETS['tiny']['size']
        assert np.asarray(im).max() > 4095  # the values use the 16-bit range, not 12 bits stored in 16
    for p in dcms:
        ds = pydicom.dcmread(p)
        assert (ds.BitsAllocated, ds.BitsStored, ds.Modality) == (16, 12, 'CR')
        assert ds.PhotometricInterpretation in ('MONOCHROME1', 'MONOCHROME2')
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) and ds.pixel_array.max() <= 4095
    assert {pydicom.dcmread(p).PhotometricInterpretation for p in dcms} == {'MONOCHROME1', 'MONOCHROME2'}


def test_csvs_pass_the_data_validators(tiny, padchest):
    from cxrlt.data import join_padchest, read_image_ids, read_removal_csv, read_test_csv, read_training_csv
    a, _ = tiny
    train = read_training_csv(a/TRAINING_CSV)
    assert len(train) == SYNTH_PRESETS['tiny']['n'] - round(SYNTH_PRESETS['tiny']['n'] * 0.2)
    assert list(train.columns[3:]) == CLASSES
    answers = read_training_csv(a/TEST_LABELS_CSV)
    test = read_test_csv(a/TEST_CSV)
    assert test['ImageID'].tolist() == answers['ImageID'].tolist()
    assert set(read_removal_csv(a/REMOVAL_CSV)) <= set(train['ImageID'])
    assert set(read_image_ids(a/TEST_CSV)).isdisjoint(train['ImageID'])
    # the real ImageIDs join the master CSV: every training image finds its true patient
    joined = join_padchest(train, unmatched='error')
    assert joined.attrs['padchest_join']['matched'] == len(train)
    assert joined.attrs['padchest_join']['coarse_id_mismatches'] == 0
    true = padchest.set_index('ImageID').loc[train['ImageID']]
    assert joined['PadChestPatientID'].tolist() == true['PatientID'].tolist()
    test_patients = padchest.set_index('ImageID').reindex(test['ImageID'].str.replace('.dcm', '.png'))['PatientID']
    assert set(joined['PadChestPatientID']).isdisjoint(test_patients)


def test_image_reader_sees_the_same_picture_in_png_and_dicom(tmp_path):
    "cxrlt.images decodes the 16-bit PNG and the inverted (MONOCHROME1) DICOM of one radiograph alike."
    from cxrlt.images import read_image
    img, _ = render_radiograph(['cardiomegaly'], 'PA', seed=1, index=4, size=96)
    png = read_image(write_png16(img, tmp_path/'x.png'))
    dcm = read_image(write_dicom(img, tmp_path/'x.dcm', 'test x', monochrome1=True))
    assert png.shape == dcm.shape == img.shape
    assert np.corrcoef(png.ravel(), dcm.ravel())[0, 1] > 0.99
    assert np.corrcoef(png.ravel(), img.ravel())[0, 1] > 0.99


def test_demo_preset_has_every_class(padchest):
    "Sampling only: the demo preset gives every class its minimum of training and test positives."
    p = SYNTH_PRESETS['demo']
    n_test = round(p['n'] * 0.2)
    s = sample_padchest(padchest, p['n'] - n_test, n_test, p['min_positives'], p['min_test_positives'], seed=0)
    train, test = s[s.split == 'train'], s[s.split == 'test']
    assert (train[CLASSES].sum() >= p['min_positives']).all()
    assert (test[CLASSES].sum() >= p['min_test_positives']).all()
    # the head keeps PadChest's own share (no forced draws): Normal within a few points of 50,616 / 160,861
    assert abs(train['Normal'].mean() - 50616 / 160861) < 0.06


def test_every_padchest_label_is_mapped(padchest):
    seen = {lab for labels in padchest['Labels'].dropna() for lab in labels}
    assert seen == set(synth.PADCHEST_TO_CLASSES)
    assert {c for classes in synth.PADCHEST_TO_CLASSES.values() for c in classes} == set(CLASSES)


SIGNS = [c for c in CLASSES if c != 'Normal']


@pytest.mark.parametrize('projection', ['PA', 'L'])
@pytest.mark.parametrize('cls', SIGNS)
def test_sign_changes_only_its_box(cls, projection):
    "Same patient with and without one label: every change lies in the sign's box (or the view shows no sign)."
    for index in range(2):
        with_, boxes = render_radiograph([cls], projection, seed=11, index=index, size=128)
        without, _ = render_radiograph([], projection, seed=11, index=index, size=128)
        diff = np.abs(with_.astype(np.float64) - without)
        if cls not in boxes:  # azygos lobe on laterals, Kyphosis on frontals
            assert (cls, projection) in {('azygos lobe', 'L'), ('Kyphosis', 'PA')}
            assert diff.max() == 0
            continue
        x0, y0, x1, y1 = boxes[cls]
        inside = np.zeros(diff.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert diff[inside].max() > 0.01, f'{cls} ({projection}, index {index}) draws nothing visible'
        if _SIGNS[cls][0] is None:  # drawn signs: outside the box at most blur and noise spill over
            assert diff[~inside].mean() < 0.1 * diff[inside].mean(), \
                f'{cls} ({projection}, index {index}) changes pixels outside its box'


def _region_stat(cls, img):
    "A pixel statistic of the sign's region, on the image standardised to mean 0, s.d. 1 (exposure varies by patient)."
    h, w = img.shape
    z = (img - img.mean()) / img.std()
    if cls == 'cardiomegaly':
        # share of a lower-chest row band brighter than halfway from lung to soft tissue: a cardiothoracic ratio
        band = z[int(0.55 * h):int(0.65 * h)]
        profile = band[:, int(0.2 * w):int(0.8 * w)].mean(0)
        return (profile > (np.percentile(profile, 10) + np.percentile(band, 95)) / 2).mean()
    if cls == 'sternotomy':  # wires over the sternum
        return np.percentile(z[int(0.2 * h):int(0.55 * h), int(0.46 * w):int(0.54 * w)], 99)
    if cls == 'Emphysema': return z[int(0.15 * h):int(0.45 * h), int(0.15 * w):int(0.85 * w)].mean()  # upper zones
    if cls == 'hyperinflated lung':  # below the usual diaphragm
        return z[int(0.7 * h):int(0.85 * h), int(0.15 * w):int(0.85 * w)].mean()


@pytest.mark.parametrize('cls, direction',
                         [('cardiomegaly', 1), ('sternotomy', 1), ('Emphysema', -1), ('hyperinflated lung', -1)])
def test_sign_region_differs_between_patients_with_and_without(cls, direction):
    "24 patients with the label against 24 without it: the region's statistic differs (Welch's t-test, p < 0.01)."
    pos = [_region_stat(cls, render_radiograph([cls], 'PA', seed=21, index=i, size=128)[0]) for i in range(24)]
    neg = [_region_stat(cls, render_radiograph([], 'PA', seed=22, index=i, size=128)[0]) for i in range(24)]
    t, p = stats.ttest_ind(pos, neg, equal_var=False)
    assert np.sign(t) == direction and p < 0.01, (cls, np.mean(pos), np.mean(neg), p)


def test_resume_draws_only_missing_images(tmp_path, padchest):
    kw = dict(n=80, size=48, min_positives=1, min_test_positives=0, min_removal=0, n_dicom=1, padchest=padchest,
              progress=False, workers=1)
    make_synthetic_cxrlt(tmp_path, **kw)
    images = sorted((tmp_path/IMAGES_DIR).rglob('*.*'))
    before = {p: p.read_bytes() for p in images}
    signs = (tmp_path/SIGNS_CSV).read_bytes()
    for p in images[:5]: p.unlink()
    assert make_synthetic_cxrlt(tmp_path, **kw)['drawn'] == 5
    assert {p: p.read_bytes() for p in images} == before and (tmp_path/SIGNS_CSV).read_bytes() == signs
    (tmp_path/SIGNS_CSV).unlink()   # a build killed before its signs were written: they are drawn again, in memory
    for p in images[:3]: p.unlink()
    assert make_synthetic_cxrlt(tmp_path, **kw)['drawn'] == 3
    assert {p: p.read_bytes() for p in images} == before and (tmp_path/SIGNS_CSV).read_bytes() == signs


def test_signs_record_every_positive_class(tiny):
    "signs.csv holds one record per positive class of every image (Normal draws nothing), with its strength and box."
    a, _ = tiny
    signs = pd.read_csv(a/SIGNS_CSV)
    labels = pd.concat([pd.read_csv(a/TRAINING_CSV), pd.read_csv(a/TEST_LABELS_CSV)]).set_index('ImageID')[CLASSES]
    long = labels.drop(columns='Normal').stack()
    positives = {(i, c) for (i, c), v in long.items() if v == 1}
    assert set(zip(signs.ImageID, signs.sign)) == positives and len(signs) == len(positives)
    assert signs.strength.between(0.15, 1.0).all()
    boxed = signs.box_area.dropna()
    assert len(boxed) >= 0.95 * len(signs) and boxed.between(0, 1, inclusive='right').all()
    # the strengths are uniform on [0.15, 1], as drawn
    assert stats.kstest(signs.strength, stats.uniform(0.15, 0.85).cdf).pvalue > 0.001


def test_cli_options(monkeypatch, capsys):
    from fastcore.script import anno_parser
    monkeypatch.setitem(cxrlt.cli.COMMANDS, 'synth', ('cxrlt.synth:synth_cli', 'the synthetic CXR-LT look-alike'))
    parser = anno_parser(synth.synth_cli, prog='cxrlt synth')
    helptext = parser.format_help()
    for opt in ('--preset', '--out', '--n', '--size', '--seed'): assert opt in helptext
    assert cxrlt.cli.main(['synth', '--preset', 'tiny']) == 2
    assert capsys.readouterr().err.startswith('cxrlt synth: --out is required')
    assert cxrlt.cli.main(['synth', '--preset', 'big', '--out', 'x']) == 2
    assert 'preset must be one of' in capsys.readouterr().err
    assert not Path('x').exists()
