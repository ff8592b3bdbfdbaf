"cxrlt.splits: patient-level splits and folds, their checks and their files."
import numpy as np
import pandas as pd
import pytest

from cxrlt.core import load_json
from cxrlt.data import read_padchest_master
from cxrlt.labels import CLASSES
from cxrlt.splits import (check_patient_split, iterative_stratification, load_or_make_split, load_split, patient_folds,
                          patient_labels, patient_split, save_split)


# ---------------------------------------------------------------- helpers and fixtures

def padchest_tokens(master):
    "Report labels of each image as a set of lower-case strings (independent of cxrlt)."
    import ast
    return [set(t.strip().lower() for t in ast.literal_eval(s)) if isinstance(s, str) else set()
            for s in master['Labels']]


@pytest.fixture(scope='module')
def padchest_table():
    "Every PadChest image with approximate class labels (own-name report labels) and its true patient."
    master = read_padchest_master()
    tokens = padchest_tokens(master)
    y = np.array([[c.lower() in t for c in CLASSES] for t in tokens], dtype=np.int8)
    df = pd.DataFrame(y, columns=CLASSES)
    df.insert(0, 'ImageID', master['ImageID'].to_numpy())
    df['patient_key'] = master['PatientID'].to_numpy()
    return df


# ---------------------------------------------------------------- splits

def positive_patients(df, key='patient_key'):
    "Independent reference: positive patients per class, and per class and subset."
    return df.groupby(key)[CLASSES].max()


def test_split_of_all_padchest_is_patient_safe_and_stratified(padchest_table):
    df = padchest_table
    split = patient_split(df, val_fraction=0.1, dev_fraction=0.1, seed=0)
    assert split.index.tolist() == df['ImageID'].tolist()
    # zero shared patients
    assert df.assign(s=split.to_numpy()).groupby('patient_key')['s'].nunique().max() == 1
    # every class with >= 3 positive patients has positives in train, val and dev
    pp = df.assign(s=split.to_numpy()).groupby('patient_key').agg({**{c: 'max' for c in CLASSES}, 's': 'first'})
    for c in CLASSES:
        n = pp[c].sum()
        if n >= 3: assert all(pp.loc[pp['s'] == s, c].sum() >= 1 for s in ('train', 'val', 'dev')), c
        for s in ('val', 'dev'):   # stratified, not just covered
            if n >= 200: assert abs(pp.loc[pp['s'] == s, c].sum() / n - 0.1) < 0.01, (c, s)
    for s in ('val', 'dev'):
        assert abs((pp['s'] == s).mean() - 0.1) < 0.002
        assert abs((split == s).mean() - 0.1) < 0.01


def test_split_rare_classes_deterministic_and_coarse_key():
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random((n, len(CLASSES))) < 0.3 * 0.8 ** np.arange(len(CLASSES))).astype(np.int8)
    df = pd.DataFrame(np.repeat(y, 2, axis=0), columns=CLASSES)
    df.insert(0, 'ImageID', [f'p{i // 2}_{i % 2}.png' for i in range(2 * n)])
    df['patient_key'] = [f'P{i // 2}' for i in range(2 * n)]
    for c, pats in [('Hernia', [5, 9]), ('Mass', [11, 12, 13]), ('fracture', [20])]:
        df[c] = df['patient_key'].isin([f'P{p}' for p in pats]).astype(np.int8)
    def subsets_of(split, c):
        positive = df.loc[df[c] == 1]
        return set(positive.assign(s=split[positive['ImageID']].to_numpy()).groupby('patient_key')['s'].first())
    two_way = patient_split(df, 0.1, dev_fraction=0, seed=3)
    assert subsets_of(two_way, 'Hernia') == subsets_of(two_way, 'Mass') == {'train', 'val'}
    split = patient_split(df, 0.1, seed=3)   # three-way: a class with 3 positive patients reaches every subset
    assert subsets_of(split, 'Mass') == {'train', 'val', 'dev'}
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
    split = patient_split(df, 0.25, dev_fraction=0, seed=0)
    table = check_patient_split(df, split)
    ref = positive_patients(df)
    assert table['patients'].tolist() == ref.sum().tolist()
    bad = split.copy(); bad['i1.png'] = 'val' if bad['i1.png'] == 'train' else 'train'
    with pytest.raises(ValueError, match=r"patient 'P0' is in subsets \['train', 'val'\] "
                                         r"\(images \['i0.png', 'i1.png', 'i2.png'\]\)"):
        check_patient_split(df, bad)
    with pytest.raises(ValueError, match=r"1 images have no subset in the split \(e.g. 'i5.png'\)"):
        check_patient_split(df, split.drop('i5.png'))
    # persistence: the same split comes back; other parameters or images are refused
    path = tmp_path / 'splits' / 'split.csv'
    made = load_or_make_split(df, path, val_fraction=0.25, dev_fraction=0, seed=0)
    assert made.equals(split)
    assert path.read_text().splitlines()[0] == 'ImageID,split'
    assert load_json(path.with_suffix('.json'))['params'] == {'kind': 'split', 'val_fraction': 0.25,
                                                             'dev_fraction': 0, 'seed': 0, 'key': 'patient_key'}
    path.write_text(path.read_text() + 'removed_later.png,train\n')
    assert load_or_make_split(df, path, val_fraction=0.25, dev_fraction=0, seed=0).tolist() == split.tolist()
    with pytest.raises(ValueError, match=r"saved vs asked: \{'val_fraction': \(0.25, 0.1\)\}"):
        load_or_make_split(df, path, val_fraction=0.1, dev_fraction=0, seed=0)
    with pytest.raises(ValueError, match=r"saved vs asked: \{'dev_fraction': \(0, 0.1\)\}"):
        load_or_make_split(df, path, val_fraction=0.25, seed=0)   # a two-way split file is not silently reused
    more = pd.concat([df, df.iloc[:1].assign(ImageID='late.png', patient_key='Pz')], ignore_index=True)
    with pytest.raises(ValueError, match=r"no subset for 1 images of the table \(e.g. 'late.png'\)"):
        load_or_make_split(more, path, 0.25, 0, seed=0)
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
