"cxrlt.data: challenge files, the PadChest patient join, patient-level splits, long-tail samplers, label statistics."
import warnings
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import numpy as np
import pandas as pd
import pytest
import torch

from cxrlt.core import load_json
from cxrlt.data import (ID_COLUMNS, PADCHEST_COLUMNS, ChallengeFileError, ClassAwareSampler, ClassPowerSampler,
                        InstanceBalancedSampler, RepeatFactorSampler, SquareRootSampler, check_patient_split,
                        coarse_patient_id, cooccurrence, imbalance_ratio, is_coarse_patient_id_of,
                        iterative_stratification, join_padchest, label_statistics, load_or_make_split, load_split,
                        padchest_master_path, patient_folds, patient_labels, patient_split, plot_class_frequencies,
                        read_image_ids, read_padchest_master, read_removal_csv, read_test_csv, read_training_csv,
                        load_training_table, remove_images, sampled_class_share, save_split)
from cxrlt.labels import CLASSES


# ---------------------------------------------------------------- helpers and fixtures

def write_csv(path, header, rows):
    "Write a CSV by hand (no pandas), so the file is exactly what the test says."
    Path(path).write_text('\n'.join([','.join(header)] + [','.join(r) for r in rows]) + '\n', encoding='utf-8')
    return Path(path)


def training_rows(n=4, positives=None):
    "Rows of a valid training CSV in `ID_COLUMNS + CLASSES` order."
    positives = positives or {}
    rows = []
    for i in range(n):
        labels = ['1' if CLASSES[j] in positives.get(i, ['Normal']) else '0' for j in range(len(CLASSES))]
        rows.append([f'img{i}_x.png', '20150101', f'{i + 1}.00E+38'] + labels)
    return rows


HEADER = ID_COLUMNS + CLASSES


@pytest.fixture(scope='module')
def master():
    return read_padchest_master()


@pytest.fixture(scope='module')
def sample(master):
    "All images of 40 PadChest patients, drawn at run time (never stored)."
    pids = master['PatientID'].drop_duplicates().sample(40, random_state=1)
    return master[master['PatientID'].isin(pids)].reset_index(drop=True)


def padchest_tokens(master):
    "Report labels of each image as a set of lower-case strings (independent of cxrlt)."
    import ast
    return [set(t.strip().lower() for t in ast.literal_eval(s)) if isinstance(s, str) else set() for s in master['Labels']]


@pytest.fixture(scope='module')
def padchest_table(master):
    "Every PadChest image with approximate class labels (own-name report labels) and its true patient."
    tokens = padchest_tokens(master)
    y = np.array([[c.lower() in t for c in CLASSES] for t in tokens], dtype=np.int8)
    df = pd.DataFrame(y, columns=CLASSES)
    df.insert(0, 'ImageID', master['ImageID'].to_numpy())
    df['patient_key'] = master['PatientID'].to_numpy()
    return df


# ---------------------------------------------------------------- challenge files

def test_training_csv_reads_tabbed_shuffled_header(tmp_path):
    rng = np.random.default_rng(0)
    order = list(rng.permutation(len(CLASSES)))
    header = ID_COLUMNS + [CLASSES[j] + '\t' for j in order]
    rows = [[f'i{i}.png', '20140915', '3.24E+38'] + [str(int((i + j) % 3 == 0)) for j in order] for i in range(6)]
    df = read_training_csv(write_csv(tmp_path / 't.csv', header, rows))
    assert list(df.columns) == ID_COLUMNS + CLASSES
    assert all(df[c].dtype == np.int8 for c in CLASSES)
    for i in range(6):
        assert [df.loc[i, c] for c in CLASSES] == [int((i + j) % 3 == 0) for j in range(len(CLASSES))]
    assert df['PatientID'].tolist() == ['3.24E+38'] * 6
    assert df['StudyDate_DICOM'].tolist() == [20140915] * 6


@pytest.mark.parametrize('header, expected', [
    ([h if h != 'Nodule' else 'nodule' for h in HEADER], "column 8 'nodule' is not a column of the training CSV (did you mean 'Nodule'?)"),
    ([h if h != 'fracture' else 'fractures' for h in HEADER], "'fractures' is not a column of the training CSV (did you mean 'fracture'?)"),
    (HEADER + ['Scoliosis'], "column 34 'Scoliosis' is not a column of the training CSV"),
    (HEADER[:-1], "column 'calcified densities' is missing"),
    ([h if h != 'Mass' else 'cardiomegaly\t' for h in HEADER], "column 20 'cardiomegaly\\t' repeats column 6"),
    ([h if h != 'PatientID' else 'Patient' for h in HEADER], "column 'PatientID' is missing"),
])
def test_training_csv_header_errors_name_the_column(tmp_path, header, expected):
    rows = [r[:len(header)] + ['0'] * (len(header) - len(r)) for r in training_rows()]
    path = write_csv(tmp_path / 'train.csv', header, rows)
    with pytest.raises(ChallengeFileError) as e: read_training_csv(path)
    assert str(path) in str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize('value, expected', [
    ('2', "column 'Mass': '2' is not 0 or 1 on line 4 (ImageID 'img2_x.png')"),
    ('1.0', "column 'Mass': '1.0' is not 0 or 1 on line 4"),
    (' 1', "column 'Mass': ' 1' is not 0 or 1 on line 4"),
    ('yes', "column 'Mass': 'yes' is not 0 or 1 on line 4"),
    ('', "column 'Mass': empty cell on line 4"),
])
def test_training_csv_label_values_are_never_coerced(tmp_path, value, expected):
    rows = training_rows()
    rows[2][HEADER.index('Mass')] = value
    path = write_csv(tmp_path / 'train.csv', HEADER, rows)
    with pytest.raises(ChallengeFileError, match='labels must be 0 or 1') as e: read_training_csv(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_training_csv_identifier_errors(tmp_path):
    rows = training_rows(5)
    rows[3][0] = rows[1][0]
    with pytest.raises(ChallengeFileError, match=r"column 'ImageID': 'img1_x.png' appears on lines 3, 5"): read_training_csv(write_csv(tmp_path / 'a.csv', HEADER, rows))
    rows = training_rows(5); rows[4][0] = ''
    with pytest.raises(ChallengeFileError, match=r"column 'ImageID': empty cell on line 6"): read_training_csv(write_csv(tmp_path / 'b.csv', HEADER, rows))
    rows = training_rows(5); rows[0][2] = ' '
    with pytest.raises(ChallengeFileError, match=r"column 'PatientID': empty cell on line 2"): read_training_csv(write_csv(tmp_path / 'c.csv', HEADER, rows))
    for bad in ['2015-01-01', '20151301', '2015011', '']:
        rows = training_rows(5); rows[2][1] = bad
        with pytest.raises(ChallengeFileError, match=r"column 'StudyDate_DICOM'.* line 4"): read_training_csv(write_csv(tmp_path / 'd.csv', HEADER, rows))


def test_training_csv_broken_rows(tmp_path):
    rows = training_rows(4)
    short = rows[:2] + [rows[2][:20]] + rows[3:]
    with pytest.raises(ChallengeFileError, match=r"column 'Pneumothorax': empty cell on line 4"):
        read_training_csv(write_csv(tmp_path / 'short.csv', HEADER, short))
    long_ = rows[:1] + [rows[1] + ['1']] + rows[2:]
    with pytest.raises(ChallengeFileError, match=r'long\.csv: not a readable CSV file: .*line 3'):
        read_training_csv(write_csv(tmp_path / 'long.csv', HEADER, long_))
    (tmp_path / 'blank.csv').write_text('\n'.join([','.join(HEADER)] + [','.join(r) for r in rows[:2]] + [''] + [','.join(rows[2])]) + '\n')
    with pytest.raises(ChallengeFileError, match=r"column 'ImageID': empty cell on line 4"): read_training_csv(tmp_path / 'blank.csv')
    (tmp_path / 'empty.csv').write_text('')
    with pytest.raises(ChallengeFileError, match=r'empty\.csv: the file is empty'): read_training_csv(tmp_path / 'empty.csv')
    with pytest.raises(FileNotFoundError, match='nothere.csv'): read_training_csv(tmp_path / 'nothere.csv')


def test_test_csv_and_image_ids(tmp_path):
    path = write_csv(tmp_path / 'dev.csv', ID_COLUMNS, [['a.png', '20160101', '1.00E+38'], ['b.dcm', '20160102', '2.00E+38']])
    df = read_test_csv(path)
    assert list(df.columns) == ID_COLUMNS and df['ImageID'].tolist() == ['a.png', 'b.dcm']
    assert read_image_ids(path) == ['a.png', 'b.dcm']
    with pytest.raises(ChallengeFileError, match=r"column 4 'Normal' is a label column, which a test CSV must not have"):
        read_test_csv(write_csv(tmp_path / 'lab.csv', ID_COLUMNS + ['Normal'], [['a.png', '20160101', '1.00E+38', '1']]))
    with pytest.raises(ChallengeFileError, match=r"column 'StudyDate_DICOM' is missing"):
        read_test_csv(write_csv(tmp_path / 'nodate.csv', ['ImageID', 'PatientID'], [['a.png', '1.00E+38']]))
    with pytest.raises(ChallengeFileError, match=r"dup\.csv: column 'ImageID': 'a.png' appears on lines 2, 4"):
        read_image_ids(write_csv(tmp_path / 'dup.csv', ['ImageID', 'x'], [['a.png', '1'], ['b.png', '2'], ['a.png', '3']]))
    with pytest.raises(ChallengeFileError, match=r"noid\.csv: no 'ImageID' column \(did you mean 'imageid'\?\)"):
        read_image_ids(write_csv(tmp_path / 'noid.csv', ['imageid'], [['a.png']]))
    # a BOM from a spreadsheet export and tabs around names are fine
    (tmp_path / 'bom.csv').write_text('\ufeffImageID\t,other\nq.png,1\n', encoding='utf-8')
    assert read_image_ids(tmp_path / 'bom.csv') == ['q.png']


def test_removal(tmp_path):
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, training_rows(5)))
    ids = read_removal_csv(write_csv(tmp_path / 'Removal.csv', ['ImageID'], [['img1_x.png'], ['img3_x.png'], ['gone.png']]))
    out = remove_images(df, ids)
    assert out['ImageID'].tolist() == ['img0_x.png', 'img2_x.png', 'img4_x.png']
    assert out.attrs['removal'] == {'source': 'Removal.csv', 'listed': 3, 'removed': 2, 'not_in_table': 1, 'remaining': 3}
    with pytest.raises(ChallengeFileError, match=r"Removal2\.csv: column 'ImageID': empty cell on line 3"):
        read_removal_csv(write_csv(tmp_path / 'Removal2.csv', ['ImageID'], [['a.png'], [''], ['b.png']]))


# ---------------------------------------------------------------- true patients

def test_master_csv_is_found_and_cached(master):
    path = padchest_master_path()
    assert 'torchxrayvision' in str(path) and path.name.startswith('PADCHEST_chest_x_ray_images_labels_160K')
    assert list(master.columns) == PADCHEST_COLUMNS
    assert len(master) == 160_861 and master['PatientID'].nunique() == 67_625
    assert master['PatientID'].map(type).eq(str).all() and master['PatientID'].str.fullmatch(r'\d{30,40}').all()
    import time
    t = time.perf_counter(); again = read_padchest_master(); assert time.perf_counter() - t < 0.5
    again['x'] = 1
    assert 'x' not in read_padchest_master().columns


def test_coarse_id_is_the_leading_digits_of_the_true_one(master):
    patients = master['PatientID'].drop_duplicates()
    # independent reference: Python's own E formatting of the integer (through a float, exact to 3 digits here)
    ours = patients.map(coarse_patient_id)
    ref = patients.map(lambda p: format(int(p), '.2E'))
    assert (ours == ref).mean() > 0.9999
    # leading digits: |true - coarse| is at most half a unit of the coarse ID's last shown digit
    for c, p in zip(ours, patients):
        mantissa, exponent = c.split('E')
        unit = 10 ** (int(exponent) - 2)
        assert 2 * abs(int(p) - int(mantissa.replace('.', '')) * unit) <= unit, (c, p)
    assert all(is_coarse_patient_id_of(c, p) for c, p in zip(ours, patients))
    assert is_coarse_patient_id_of('3.24E+38', '324082674243252985564631252852964350511')
    assert not is_coarse_patient_id_of('3.24E+38', '325082674243252985564631252852964350511')
    assert not is_coarse_patient_id_of('3.24E+38', '32408267424325298556463125285296435051')
    assert not is_coarse_patient_id_of('', '324') and not is_coarse_patient_id_of('3.24E+38', 'abc')


def challenge_rows(sample):
    "Training rows as the challenge writes them (coarse PatientID) for real PadChest images."
    rows = []
    for r in sample.itertuples():
        rows.append([r.ImageID, str(r.StudyDate_DICOM), format(int(r.PatientID), '.2E')] + ['1'] + ['0'] * 29)
    return rows


def test_join_recovers_true_patients(tmp_path, master, sample):
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, challenge_rows(sample)))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        j = join_padchest(df)
    truth = {r.ImageID: r for r in master.itertuples() if r.ImageID in set(df['ImageID'])}
    assert j['PadChestPatientID'].tolist() == [truth[i].PatientID for i in df['ImageID']]
    assert j['patient_key'].tolist() == j['PadChestPatientID'].tolist()
    assert j['Projection'].tolist() == [truth[i].Projection for i in df['ImageID']]
    assert j['StudyID'].tolist() == [truth[i].StudyID for i in df['ImageID']]
    sex = [truth[i].PatientSex_DICOM for i in df['ImageID']]
    assert [a if isinstance(a, str) else None for a in j['PatientSex']] == [a if isinstance(a, str) else None for a in sex]
    age = np.array([truth[i].StudyDate_DICOM // 10000 - truth[i].PatientBirth for i in df['ImageID']], float)
    np.testing.assert_array_equal(j['PatientAge'].to_numpy(), age)
    rep = j.attrs['padchest_join']
    assert (rep['rows'], rep['matched'], rep['unmatched'], rep['coarse_id_mismatches'], rep['study_date_mismatches']) == (len(df), len(df), 0, 0, 0)
    # the coarse key would merge patients that the true key keeps apart
    assert j['patient_key'].nunique() == 40


def test_join_unmatched_falls_back_with_a_warning(tmp_path, sample):
    rows = challenge_rows(sample.head(5)) + [['unknown_1.png', '20150101', '9.99E+37'] + ['0'] * 29 + ['1']]
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, rows))
    with pytest.warns(UserWarning, match=r"1 of 6 images are not in the PadChest master CSV \(e.g. 'unknown_1.png'\)"):
        j = join_padchest(df)
    assert j['patient_key'].iloc[-1] == 'coarse:9.99E+37' and j['patient_source'].tolist() == ['padchest'] * 5 + ['coarse']
    assert j.attrs['padchest_join']['unmatched_examples'] == ['unknown_1.png']
    with pytest.raises(ChallengeFileError, match="unknown_1.png"): join_padchest(df, unmatched='error')


def test_join_warns_on_disagreeing_ids_and_dates(tmp_path, sample):
    rows = challenge_rows(sample.head(6))
    rows[1][2] = '1.00E+30'
    rows[2][1] = '19990101'
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, rows))
    with pytest.warns(UserWarning) as rec: j = join_padchest(df)
    msgs = ' | '.join(str(w.message) for w in rec)
    assert f"ImageID {rows[1][0]!r}: '1.00E+30'" in msgs
    assert f"ImageID {rows[2][0]!r}: 19990101" in msgs
    assert j.attrs['padchest_join']['coarse_id_mismatches'] == 1 and j.attrs['padchest_join']['study_date_mismatches'] == 1


def test_join_with_a_user_master_csv(tmp_path, master, sample):
    user = master[master['ImageID'].isin(sample['ImageID'].head(3))]
    user.to_csv(tmp_path / 'mine.csv', index=False)
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, challenge_rows(sample.head(3))))
    j = join_padchest(df, tmp_path / 'mine.csv')
    assert j['PadChestPatientID'].tolist() == sample['PatientID'].head(3).tolist()
    user.drop(columns=['Projection']).to_csv(tmp_path / 'wrong.csv', index=False)
    with pytest.raises(ChallengeFileError, match=r"wrong\.csv: not the PadChest master CSV: column\(s\) 'Projection' missing"):
        join_padchest(df, tmp_path / 'wrong.csv')
    with pytest.raises(FileNotFoundError, match='absent.csv'): read_padchest_master(tmp_path / 'absent.csv')


# ---------------------------------------------------------------- splits

def positive_patients(df, key='patient_key'):
    "Independent reference: positive patients per class, and per class and subset."
    return df.groupby(key)[CLASSES].max()


def test_split_of_all_padchest_is_patient_safe_and_stratified(padchest_table):
    df = padchest_table
    split = patient_split(df, val_fraction=0.1, seed=0)
    assert split.index.tolist() == df['ImageID'].tolist()
    # zero shared patients
    assert df.assign(s=split.to_numpy()).groupby('patient_key')['s'].nunique().max() == 1
    # every class with >= 2 positive patients has positives in val (and train)
    pp = df.assign(s=split.to_numpy()).groupby('patient_key').agg({**{c: 'max' for c in CLASSES}, 's': 'first'})
    for c in CLASSES:
        n = pp[c].sum()
        if n >= 2: assert pp.loc[pp['s'] == 'val', c].sum() >= 1 and pp.loc[pp['s'] == 'train', c].sum() >= 1, c
        if n >= 200: assert abs(pp.loc[pp['s'] == 'val', c].sum() / n - 0.1) < 0.01, c   # stratified, not just covered
    assert abs((pp['s'] == 'val').mean() - 0.1) < 0.002
    assert abs((split == 'val').mean() - 0.1) < 0.01


def test_split_rare_classes_deterministic_and_coarse_key():
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random((n, len(CLASSES))) < 0.3 * 0.8 ** np.arange(len(CLASSES))).astype(np.int8)
    df = pd.DataFrame(np.repeat(y, 2, axis=0), columns=CLASSES)
    df.insert(0, 'ImageID', [f'p{i // 2}_{i % 2}.png' for i in range(2 * n)])
    df['patient_key'] = [f'P{i // 2}' for i in range(2 * n)]
    for c, pats in [('Hernia', [5, 9]), ('Mass', [11, 12, 13]), ('fracture', [20])]:
        df[c] = df['patient_key'].isin([f'P{p}' for p in pats]).astype(np.int8)
    split = patient_split(df, 0.1, seed=3)
    for c in ['Hernia', 'Mass']:
        got = df.loc[df[c] == 1].assign(s=split[df.loc[df[c] == 1, 'ImageID']].to_numpy()).groupby('patient_key')['s'].first()
        assert set(got) == {'train', 'val'}, c
    assert split.equals(patient_split(df, 0.1, seed=3)) and not split.equals(patient_split(df, 0.1, seed=4))
    # the challenge's coarse PatientID can be used as the key, on request
    coarse = df.assign(PatientID=[f'{1 + (i // 20) % 9}.00E+38' for i in range(2 * n)])
    s2 = patient_split(coarse, 0.2, seed=0, key='PatientID')
    assert coarse.assign(s=s2.to_numpy()).groupby('PatientID')['s'].nunique().max() == 1
    with pytest.raises(KeyError, match='run join_padchest'): patient_split(df.drop(columns='patient_key'))
    with pytest.raises(ValueError, match='val_fraction must lie in'): patient_split(df, 1.0)


def test_folds(padchest_table):
    df = padchest_table.iloc[:40_000]
    folds = patient_folds(df, k=5, seed=0)
    d = df.assign(f=folds.to_numpy())
    assert d.groupby('patient_key')['f'].nunique().max() == 1
    pp = d.groupby('patient_key').agg({**{c: 'max' for c in CLASSES}, 'f': 'first'})
    for c in CLASSES:
        if pp[c].sum() >= 5: assert (pp.groupby('f')[c].sum() > 0).sum() == 5, c
    sizes = pp['f'].value_counts()
    assert sizes.max() - sizes.min() <= 0.01 * len(pp)


def test_iterative_stratification_hits_the_desired_counts():
    # single-label units: stratification must put round(r * n_l) (within one) of every label in each subset
    rng = np.random.default_rng(0)
    lab = rng.choice(6, size=1000, p=[0.5, 0.2, 0.15, 0.1, 0.04, 0.01])
    y = np.eye(6, dtype=int)[lab]
    r = np.array([0.6, 0.3, 0.1])
    s = iterative_stratification(y, r, seed=0)
    counts = np.stack([y[s == j].sum(0) for j in range(3)])
    assert np.all(np.abs(counts - np.outer(r, y.sum(0))) < 1 + 1e-9)
    assert np.all(np.abs(np.bincount(s) - r * 1000) <= 1 + 1e-9)
    with pytest.raises(ValueError, match='0/1'): iterative_stratification(y * 2, r)


def test_split_check_and_persistence(tmp_path):
    df = pd.DataFrame({'ImageID': [f'i{i}.png' for i in range(60)], 'patient_key': [f'P{i // 3}' for i in range(60)]})
    for j, c in enumerate(CLASSES): df[c] = ((np.arange(60) // 3 + j) % 4 == 0).astype(np.int8)
    split = patient_split(df, 0.25, seed=0)
    table = check_patient_split(df, split)
    ref = positive_patients(df)
    assert table['patients'].tolist() == ref.sum().tolist()
    bad = split.copy(); bad['i1.png'] = 'val' if bad['i1.png'] == 'train' else 'train'
    with pytest.raises(ValueError, match=r"patient 'P0' is in subsets \['train', 'val'\] \(images \['i0.png', 'i1.png', 'i2.png'\]\)"):
        check_patient_split(df, bad)
    with pytest.raises(ValueError, match=r"1 images have no subset in the split \(e.g. 'i5.png'\)"):
        check_patient_split(df, split.drop('i5.png'))
    # persistence: the same split comes back; other parameters or images are refused
    path = tmp_path / 'splits' / 'split.csv'
    made = load_or_make_split(df, path, val_fraction=0.25, seed=0)
    assert made.equals(split)
    assert path.read_text().splitlines()[0] == 'ImageID,split'
    assert load_json(path.with_suffix('.json'))['params'] == {'kind': 'split', 'val_fraction': 0.25, 'seed': 0, 'key': 'patient_key'}
    path.write_text(path.read_text() + 'removed_later.png,train\n')
    assert load_or_make_split(df, path, val_fraction=0.25, seed=0).tolist() == split.tolist()
    with pytest.raises(ValueError, match=r"saved vs asked: \{'val_fraction': \(0.25, 0.1\)\}"): load_or_make_split(df, path, val_fraction=0.1, seed=0)
    more = pd.concat([df, df.iloc[:1].assign(ImageID='late.png', patient_key='Pz')], ignore_index=True)
    with pytest.raises(ValueError, match=r"no subset for 1 images of the table \(e.g. 'late.png'\)"): load_or_make_split(more, path, 0.25, seed=0)
    folds = patient_folds(df, k=4, seed=1)
    back = load_split(save_split(folds, tmp_path / 'folds.csv'))
    assert back.tolist() == folds.tolist() and back.name == 'fold' and back.attrs['params']['k'] == 4


def test_patient_labels():
    df = pd.DataFrame({'ImageID': ['a', 'b', 'c'], 'patient_key': ['x', 'x', 'y']})
    for c in CLASSES: df[c] = np.int8(0)
    df.loc[0, 'Mass'] = 1; df.loc[1, 'Hernia'] = 1
    p = patient_labels(df)
    assert p.index.tolist() == ['x', 'y'] and p['n_images'].tolist() == [2, 1]
    assert p.loc['x', 'Mass'] == 1 and p.loc['x', 'Hernia'] == 1 and p.loc['y', CLASSES].sum() == 0


# ---------------------------------------------------------------- samplers

def multilabel(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    prev = np.array([0.5, 0.3, 0.1, 0.03, 0.01, 0.003])
    y = (rng.random((n, len(prev))) < prev).astype(np.int8)
    y[:2, 5] = 1                                    # at least 2 positives everywhere
    y[:, 4] = 0; y[[7, 8, 9]] = 0; y[[7, 8, 9], 4] = 1     # class 4: three images that carry nothing else
    return y


def assert_share(got, expected, draws):
    "Empirical shares within 5 standard errors of the expected ones."
    expected = np.asarray(expected, float)
    se = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(np.asarray(got) - expected) <= 5 * se + 1e-12), (got, expected)


def test_instance_balanced_sampler():
    y = multilabel()
    s = InstanceBalancedSampler(y)
    idx = list(s)
    assert sorted(idx) == list(range(len(y)))
    np.testing.assert_allclose(sampled_class_share(y, idx), y.sum(0) / len(y))
    s2 = InstanceBalancedSampler(y, num_samples=2 * len(y) + 5)
    assert np.bincount(list(s2), minlength=len(y)).min() >= 2


@pytest.mark.parametrize('make, power', [(ClassAwareSampler, 0.0), (SquareRootSampler, 0.5),
                                         (lambda y, **kw: ClassPowerSampler(y, power=1.0, **kw), 1.0)])
def test_class_power_samplers_give_their_class_distribution(make, power):
    y = multilabel().astype(np.float64)
    n_c = y.sum(0)
    p = n_c ** power / (n_c ** power).sum()              # probability of drawing each class (Kang et al. 2020)
    draws = 200_000
    s = make(y, num_samples=draws, seed=7)
    np.testing.assert_allclose(s.class_probabilities, p, rtol=1e-12)
    idx = np.array(list(s))
    # a draw carries class d when the drawn class c's image has d: sum_c p_c * |c and d| / |c|
    co = y.T @ y
    expected = (p[:, None] * co / n_c[:, None]).sum(0)
    assert_share(y[idx].mean(0), expected, draws)
    # images 7, 8, 9 carry only class 4, so each is drawn with probability p_4 / 3
    counts = np.bincount(idx, minlength=10)[7:10]
    m = draws * p[4] / 3
    assert np.all(np.abs(counts - m) <= 5 * np.sqrt(m)), (counts, m)


def test_class_aware_on_single_label_is_uniform():
    y = np.repeat(np.eye(4, dtype=int), [5000, 500, 50, 5], axis=0)
    draws = 100_000
    share = sampled_class_share(y, ClassAwareSampler(y, num_samples=draws, seed=1))
    assert_share(share, [0.25] * 4, draws)
    y0 = np.concatenate([y, np.zeros((len(y), 1), int)], axis=1)
    s = ClassAwareSampler(y0, num_samples=1000)
    assert s.class_probabilities[-1] == 0 and np.isclose(s.class_probabilities[:4], 0.25).all()


def test_repeat_factor_sampler():
    y = multilabel()
    t = 0.05
    f = y.mean(0)
    r_c = np.maximum(1, np.sqrt(t / f))                   # Gupta et al. 2019, eq. for r(c)
    r_i = np.array([max([r_c[c] for c in np.flatnonzero(row)], default=1.0) for row in y])
    s = RepeatFactorSampler(y, threshold=t, seed=2)
    np.testing.assert_allclose(s.repeat_factors, r_i, rtol=1e-12)
    assert len(s) == round(r_i.sum())
    epochs = 60
    counts = np.zeros(len(y))
    for e in range(epochs):
        s.set_epoch(e)
        counts += np.bincount(list(s), minlength=len(y))
    # the rare class (3 images) is repeated r ≈ sqrt(t / f) times per epoch
    np.testing.assert_allclose(counts[[7, 8, 9]].mean() / epochs, r_i[[7, 8, 9]].mean(), rtol=0.15)
    expected = (y * r_i[:, None]).sum(0) / r_i.sum()
    got = (y * counts[:, None]).sum(0) / counts.sum()
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=1e-3)


def test_samplers_are_seeded_sharded_and_feed_a_dataloader():
    y = torch.tensor(multilabel(500))
    for cls in (InstanceBalancedSampler, ClassAwareSampler, SquareRootSampler, RepeatFactorSampler):
        a, b = cls(y, seed=4), cls(y, seed=4)
        first = list(a)
        assert list(b) == first                     # same seed, same epoch
        assert list(a) != first                     # the next pass is the next epoch
        a.set_epoch(0)
        assert list(a) == first
        assert list(cls(y, seed=5)) != first
        shards = [cls(y, num_samples=101, seed=4, num_replicas=3, rank=k) for k in range(3)]
        parts = [list(x) for x in shards]
        assert [len(p) for p in parts] == [34, 34, 34]
        full = cls(y, num_samples=102, seed=4)
        assert sorted(sum(parts, [])) == sorted(list(full))
        assert len(cls(y, num_samples=101, seed=4)) == 101
    ds = torch.utils.data.TensorDataset(torch.arange(len(y)), y)
    dl = torch.utils.data.DataLoader(ds, batch_size=64, sampler=ClassAwareSampler(y, seed=0))
    batches = list(dl)
    assert sum(len(b[0]) for b in batches) == len(y)
    with pytest.raises(ValueError, match='rank must lie in'): ClassAwareSampler(y, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match='num_samples must be a positive integer'): ClassAwareSampler(y, num_samples=0)


# ---------------------------------------------------------------- label statistics

def test_label_statistics_against_hand_computation():
    y = multilabel(2000, seed=3)
    df = pd.DataFrame(y, columns=[f'c{i}' for i in range(y.shape[1])])
    st = label_statistics(df, head_min=0.2, tail_max=0.02)
    pos = y.sum(0).astype(np.float64)
    np.testing.assert_array_equal(st['positives'].to_numpy(), pos)
    np.testing.assert_allclose(st['share'].to_numpy(), pos / 2000)
    np.testing.assert_allclose(st['negatives_per_positive'].to_numpy(), (2000 - pos) / pos)
    assert st['group'].tolist() == ['head' if p / 2000 >= 0.2 else 'tail' if p / 2000 < 0.02 else 'medium' for p in pos]
    assert imbalance_ratio(y) == pos.max() / pos[pos > 0].min()
    co = cooccurrence(df)
    ref = np.array([[int(np.sum(y[:, i] & y[:, j])) for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(co.to_numpy(), ref)
    cond = cooccurrence(df, normalize='conditional').to_numpy()
    np.testing.assert_allclose(cond[0, 1], np.sum(y[:, 0] & y[:, 1]) / y[:, 0].sum())
    full = pd.DataFrame(np.zeros((10, 30), np.int8), columns=CLASSES).assign(ImageID='x')
    full.loc[:2, 'Hernia'] = 1
    assert label_statistics(full).loc['Hernia', 'positives'] == 3 and label_statistics(full).index.tolist() == CLASSES
    with pytest.raises(ValueError, match="label column 'c0' must hold only 0 and 1"): label_statistics(df.replace({1: 2}))


def test_class_frequency_figure():
    y = multilabel(2000, seed=3)
    y = np.concatenate([y, np.zeros((len(y), 24), int)], axis=1)
    ax = plot_class_frequencies(y)
    assert ax.get_xscale() == 'log'
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == sorted(y.sum(0).tolist())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == 'Normal' and 'calcified densities (none)' in labels
    colours = {tuple(np.round(p.get_facecolor(), 3)) for p in ax.patches if p.get_width() > 0}
    assert len(colours) == 3   # head, medium and tail


def test_load_training_table(tmp_path, sample):
    rows = challenge_rows(sample)
    train = write_csv(tmp_path / 'train.csv', HEADER, rows)
    removal = write_csv(tmp_path / 'Removal.csv', ['ImageID'], [[rows[0][0]], [rows[3][0]]])
    df = load_training_table(train, removal)
    assert df['ImageID'].tolist() == [r[0] for i, r in enumerate(rows) if i not in (0, 3)]
    assert df['PadChestPatientID'].tolist() == [p for i, p in enumerate(sample['PatientID']) if i not in (0, 3)]
    assert df.attrs['removal']['removed'] == 2 and df.attrs['padchest_join']['matched'] == len(rows) - 2
