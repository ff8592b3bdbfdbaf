"cxrlt.data: challenge files, the PadChest master CSV and patient join, the training table."
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxrlt.core import log_to_file
from cxrlt.data import (ID_COLUMNS, PADCHEST_COLUMNS, ChallengeFileError, coarse_patient_id, is_coarse_patient_id_of,
                        join_padchest, load_training_table, padchest_master_path, read_image_ids, read_padchest_master,
                        read_removal_csv, read_test_csv, read_training_csv, remove_images)
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
    ([h if h != 'Nodule' else 'nodule' for h in HEADER],
     "column 8 'nodule' is not a column of the training CSV (did you mean 'Nodule'?)"),
    ([h if h != 'fracture' else 'fractures' for h in HEADER],
     "'fractures' is not a column of the training CSV (did you mean 'fracture'?)"),
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
    with pytest.raises(ChallengeFileError, match=r"column 'ImageID': 'img1_x.png' appears on lines 3, 5"):
        read_training_csv(write_csv(tmp_path / 'a.csv', HEADER, rows))
    rows = training_rows(5); rows[4][0] = ''
    with pytest.raises(ChallengeFileError, match=r"column 'ImageID': empty cell on line 6"):
        read_training_csv(write_csv(tmp_path / 'b.csv', HEADER, rows))
    rows = training_rows(5); rows[0][2] = ' '
    with pytest.raises(ChallengeFileError, match=r"column 'PatientID': empty cell on line 2"):
        read_training_csv(write_csv(tmp_path / 'c.csv', HEADER, rows))
    for bad in ['2015-01-01', '20151301', '2015011', '']:
        rows = training_rows(5); rows[2][1] = bad
        with pytest.raises(ChallengeFileError, match=r"column 'StudyDate_DICOM'.* line 4"):
            read_training_csv(write_csv(tmp_path / 'd.csv', HEADER, rows))


def test_training_csv_broken_rows(tmp_path):
    rows = training_rows(4)
    short = rows[:2] + [rows[2][:20]] + rows[3:]
    with pytest.raises(ChallengeFileError, match=r"column 'Pneumothorax': empty cell on line 4"):
        read_training_csv(write_csv(tmp_path / 'short.csv', HEADER, short))
    long_ = rows[:1] + [rows[1] + ['1']] + rows[2:]
    with pytest.raises(ChallengeFileError, match=r'long\.csv: not a readable CSV file: .*line 3'):
        read_training_csv(write_csv(tmp_path / 'long.csv', HEADER, long_))
    lines = [','.join(HEADER)] + [','.join(r) for r in rows[:2]] + [''] + [','.join(rows[2])]
    (tmp_path / 'blank.csv').write_text('\n'.join(lines) + '\n')
    with pytest.raises(ChallengeFileError, match=r"column 'ImageID': empty cell on line 4"):
        read_training_csv(tmp_path / 'blank.csv')
    (tmp_path / 'empty.csv').write_text('')
    with pytest.raises(ChallengeFileError, match=r'empty\.csv: the file is empty'):
        read_training_csv(tmp_path / 'empty.csv')
    with pytest.raises(FileNotFoundError, match='nothere.csv'): read_training_csv(tmp_path / 'nothere.csv')


def test_test_csv_and_image_ids(tmp_path):
    path = write_csv(tmp_path / 'dev.csv', ID_COLUMNS,
                     [['a.png', '20160101', '1.00E+38'], ['b.dcm', '20160102', '2.00E+38']])
    df = read_test_csv(path)
    assert list(df.columns) == ID_COLUMNS and df['ImageID'].tolist() == ['a.png', 'b.dcm']
    assert read_image_ids(path) == ['a.png', 'b.dcm']
    with pytest.raises(ChallengeFileError,
                       match=r"column 4 'Normal' is a label column, which a test CSV must not have"):
        read_test_csv(write_csv(tmp_path / 'lab.csv', ID_COLUMNS + ['Normal'],
                                [['a.png', '20160101', '1.00E+38', '1']]))
    with pytest.raises(ChallengeFileError, match=r"column 'StudyDate_DICOM' is missing"):
        read_test_csv(write_csv(tmp_path / 'nodate.csv', ['ImageID', 'PatientID'], [['a.png', '1.00E+38']]))
    with pytest.raises(ChallengeFileError, match=r"dup\.csv: column 'ImageID': 'a.png' appears on lines 2, 4"):
        read_image_ids(write_csv(tmp_path / 'dup.csv', ['ImageID', 'x'],
                                 [['a.png', '1'], ['b.png', '2'], ['a.png', '3']]))
    with pytest.raises(ChallengeFileError, match=r"noid\.csv: no 'ImageID' column \(did you mean 'imageid'\?\)"):
        read_image_ids(write_csv(tmp_path / 'noid.csv', ['imageid'], [['a.png']]))
    # a BOM from a spreadsheet export and tabs around names are fine
    (tmp_path / 'bom.csv').write_text('\ufeffImageID\t,other\nq.png,1\n', encoding='utf-8')
    assert read_image_ids(tmp_path / 'bom.csv') == ['q.png']


def test_removal(tmp_path):
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, training_rows(5)))
    ids = read_removal_csv(write_csv(tmp_path / 'Removal.csv', ['ImageID'],
                                     [['img1_x.png'], ['img3_x.png'], ['gone.png']]))
    out = remove_images(df, ids)
    assert out['ImageID'].tolist() == ['img0_x.png', 'img2_x.png', 'img4_x.png']
    assert out.attrs['removal'] == {'source': 'Removal.csv', 'listed': 3, 'removed': 2, 'not_in_table': 1,
                                    'remaining': 3}
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
    text_or_none = lambda values: [a if isinstance(a, str) else None for a in values]
    assert text_or_none(j['PatientSex']) == text_or_none(sex)
    age = np.array([truth[i].StudyDate_DICOM // 10000 - truth[i].PatientBirth for i in df['ImageID']], float)
    np.testing.assert_array_equal(j['PatientAge'].to_numpy(), age)
    rep = j.attrs['padchest_join']
    counts = (rep['rows'], rep['matched'], rep['unmatched'], rep['coarse_id_mismatches'], rep['study_date_mismatches'])
    assert counts == (len(df), len(df), 0, 0, 0)
    # the coarse key would merge patients that the true key keeps apart
    assert j['patient_key'].nunique() == 40


def test_join_unmatched_falls_back_with_a_warning(tmp_path, sample):
    rows = challenge_rows(sample.head(5)) + [['unknown_1.png', '20150101', '9.99E+37'] + ['0'] * 29 + ['1']]
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, rows))
    with pytest.warns(UserWarning, match=r"1 of 6 images are not in the PadChest master CSV \(e.g. 'unknown_1.png'\)"):
        j = join_padchest(df)
    assert j['patient_key'].iloc[-1] == 'coarse:9.99E+37'
    assert j['patient_source'].tolist() == ['padchest'] * 5 + ['coarse']
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
    assert j.attrs['padchest_join']['coarse_id_mismatches'] == 1
    assert j.attrs['padchest_join']['study_date_mismatches'] == 1
    # every warning of the join points at the code that called join_padchest (here: this test)
    assert len(rec) == 2 and {w.filename for w in rec} == {__file__}


def test_join_with_a_user_master_csv(tmp_path, master, sample):
    user = master[master['ImageID'].isin(sample['ImageID'].head(3))]
    user.to_csv(tmp_path / 'mine.csv', index=False)
    df = read_training_csv(write_csv(tmp_path / 't.csv', HEADER, challenge_rows(sample.head(3))))
    j = join_padchest(df, tmp_path / 'mine.csv')
    assert j['PadChestPatientID'].tolist() == sample['PatientID'].head(3).tolist()
    user.drop(columns=['Projection']).to_csv(tmp_path / 'wrong.csv', index=False)
    with pytest.raises(ChallengeFileError,
                       match=r"wrong\.csv: not the PadChest master CSV: column\(s\) 'Projection' missing"):
        join_padchest(df, tmp_path / 'wrong.csv')
    with pytest.raises(FileNotFoundError, match='absent.csv'): read_padchest_master(tmp_path / 'absent.csv')


# ---------------------------------------------------------------- the training table

def test_load_training_table(tmp_path, sample):
    rows = challenge_rows(sample)
    train = write_csv(tmp_path / 'train.csv', HEADER, rows)
    removal = write_csv(tmp_path / 'Removal.csv', ['ImageID'], [[rows[0][0]], [rows[3][0]]])
    df = load_training_table(train, removal)
    assert df['ImageID'].tolist() == [r[0] for i, r in enumerate(rows) if i not in (0, 3)]
    assert df['PadChestPatientID'].tolist() == [p for i, p in enumerate(sample['PatientID']) if i not in (0, 3)]
    assert df.attrs['removal']['removed'] == 2 and df.attrs['padchest_join']['matched'] == len(rows) - 2


# ---------------------------------------------------------------- the release's layouts (replicas with invented IDs)

UNNAMED = 30  # empty names after the identifiers of the released test CSV, empty fields at the end of its rows
RELEASE_IDS = [['img0001.png', '20160101', '1.23E+38'], ['img0002.png', '20160102', '1.00E+30'],
               ['img0003.png', '20151231', '4.56E+37']]
LAYOUTS = [pytest.param(eol, final, id=f"{name}-{'final-newline' if final else 'no-final-newline'}")
           for name, eol in [('lf', '\n'), ('crlf', '\r\n')] for final in [True, False]]


def write_release(path, header, rows, eol='\n', final_newline=True):
    "Write a CSV byte for byte: `eol` between lines, and after the last one only when `final_newline`."
    text = eol.join(','.join(r) for r in [header] + rows) + (eol if final_newline else '')
    Path(path).write_bytes(text.encode('utf-8'))
    return Path(path)


def released_test(rows=RELEASE_IDS, unnamed=UNNAMED):
    "Header and rows of the released test CSV: the identifiers, then `unnamed` empty names and empty fields."
    return ID_COLUMNS + [''] * unnamed, [list(r) + [''] * unnamed for r in rows]


def read_logged(tmp_path, reader, path):
    "`reader(path)` and the messages the cxrlt logger wrote while it ran."
    with log_to_file(tmp_path / 'read.log') as log: out = reader(path)
    return out, [line.split(' INFO ', 1)[1] for line in log.read_text().splitlines() if ' INFO ' in line]


@pytest.mark.parametrize('eol, final', LAYOUTS)
def test_released_test_csv_layout_reads(tmp_path, eol, final):
    path = write_release(tmp_path / 'CXRLT_2026_TEST_ALL_TASK1.csv', *released_test(), eol=eol, final_newline=final)
    df, logged = read_logged(tmp_path, read_test_csv, path)
    assert list(df.columns) == ID_COLUMNS
    assert df['ImageID'].tolist() == [r[0] for r in RELEASE_IDS]
    assert df['StudyDate_DICOM'].tolist() == [int(r[1]) for r in RELEASE_IDS]
    assert df['PatientID'].tolist() == [r[2] for r in RELEASE_IDS]  # the file's text, never a float
    assert df['PatientID'].map(type).eq(str).all()
    assert logged == [f'{path}: dropped 30 unnamed columns, empty on every row']
    assert read_image_ids(path) == [r[0] for r in RELEASE_IDS]


@pytest.mark.parametrize('eol, final', LAYOUTS)
def test_released_training_csv_layout_is_unchanged(tmp_path, eol, final):
    header = ID_COLUMNS + [c + '\t' for c in CLASSES]
    rows = [r[:3] + ['1' if c in ('Normal', 'sternotomy') else '0' for c in CLASSES]
            for r in [list(i) for i in RELEASE_IDS]]
    path = write_release(tmp_path / 'CXRLT_2026_training.csv', header, rows, eol=eol, final_newline=final)
    df, logged = read_logged(tmp_path, read_training_csv, path)
    assert list(df.columns) == ID_COLUMNS + CLASSES and logged == []
    assert df['PatientID'].tolist() == [r[2] for r in RELEASE_IDS]
    assert df[CLASSES].sum().to_dict() == {c: 3 if c in ('Normal', 'sternotomy') else 0 for c in CLASSES}


@pytest.mark.parametrize('eol', [pytest.param('\n', id='lf'), pytest.param('\r\n', id='crlf')])
def test_released_removal_csv_layout_reads(tmp_path, eol):
    path = write_release(tmp_path / 'Removal.csv', ID_COLUMNS, RELEASE_IDS[1:], eol=eol, final_newline=False)
    assert path.read_bytes().endswith(b'4.56E+37')
    assert read_removal_csv(path) == ['img0002.png', 'img0003.png']


def test_training_csv_drops_unnamed_empty_columns(tmp_path):
    header = ID_COLUMNS[:1] + [' '] + ID_COLUMNS[1:] + CLASSES + ['', '\t']
    rows = [[r[0], ''] + r[1:3] + ['1'] + ['0'] * 29 + [''] for r in [list(i) for i in RELEASE_IDS]]
    rows[1] = rows[1] + ['']  # the last field is there on one row and absent on the others: empty either way
    path = write_csv(tmp_path / 'train.csv', header, rows)
    df, logged = read_logged(tmp_path, read_training_csv, path)
    assert list(df.columns) == ID_COLUMNS + CLASSES
    assert df['PatientID'].tolist() == [r[2] for r in RELEASE_IDS] and df['Normal'].tolist() == [1, 1, 1]
    assert logged == [f'{path}: dropped 3 unnamed columns, empty on every row']


def unnamed_message(path, column, value, lines):
    return (f'{path}: column {column} has no name but holds {value!r} on {lines}; '
            'a column without a name must be empty on every row')


@pytest.mark.parametrize('cells, column, value, lines', [
    ({(1, 4): 'x'}, 8, 'x', 'line 3'),  # 5th unnamed field of the 2nd row
    ({(2, 29): '0'}, 33, '0', 'line 4'),  # the last field of the last row
    ({(0, 0): ' '}, 4, ' ', 'line 2'),  # a blank is a value too
    ({(2, 3): 'b', (0, 3): 'a', (1, 10): 'c'}, 7, 'a', 'lines 2, 4'),  # the first column holding one, its first line
])
@pytest.mark.parametrize('eol, final', LAYOUTS)
def test_unnamed_column_with_a_value_is_refused(tmp_path, cells, column, value, lines, eol, final):
    header, rows = released_test()
    for (r, j), v in cells.items(): rows[r][3 + j] = v
    path = write_release(tmp_path / 'test.csv', header, rows, eol=eol, final_newline=final)
    with pytest.raises(ChallengeFileError) as e: read_test_csv(path)
    assert str(e.value) == unnamed_message(path, column, value, lines)


def test_unnamed_column_with_a_value_is_refused_in_the_training_csv(tmp_path):
    rows = [r + [''] for r in training_rows(4)]
    rows[3][-1] = '1'
    path = write_csv(tmp_path / 'train.csv', HEADER + [''], rows)
    with pytest.raises(ChallengeFileError) as e: read_training_csv(path)
    assert str(e.value) == unnamed_message(path, 34, '1', 'line 5')


def test_named_column_messages_win_over_dropped_unnamed_columns(tmp_path):
    header, rows = released_test()
    path = write_csv(tmp_path / 'nodate.csv', [h for h in header if h != 'StudyDate_DICOM'],
                     [r[:1] + r[2:] for r in rows])
    with pytest.raises(ChallengeFileError) as e: read_test_csv(path)
    assert str(e.value) == (f"{path}: column 'StudyDate_DICOM' is missing. "
                            'Expected columns: ImageID, StudyDate_DICOM, PatientID')
    # a named column keeps its position in the file when an unnamed one comes before it
    path = write_csv(tmp_path / 'typo.csv', ['ImageID', '', 'StudyDate_DICOM', 'patientid'] + [''] * 3,
                     [['img0001.png', '', '20160101', '1.23E+38', '', '', '']])
    with pytest.raises(ChallengeFileError) as e: read_test_csv(path)
    assert str(e.value) == (f"{path}: column 4 'patientid' is not a column of the label-less CSV (did you mean "
                            "'PatientID'?); column 'PatientID' is missing. Expected columns: ImageID, StudyDate_DICOM, "
                            "PatientID")
    path = write_csv(tmp_path / 'label.csv', ID_COLUMNS + ['', 'Normal', ''], [r[:3] + ['', '1', ''] for r in rows])
    with pytest.raises(ChallengeFileError) as e: read_test_csv(path)
    assert str(e.value) == (f"{path}: column 5 'Normal' is a label column, which a test CSV must not have. "
                            'Expected columns: ImageID, StudyDate_DICOM, PatientID')
    path = write_csv(tmp_path / 'nomass.csv', [h for h in HEADER if h != 'Mass'] + [''] * 2,
                     [r[:HEADER.index('Mass')] + r[HEADER.index('Mass') + 1:] + ['', ''] for r in training_rows()])
    with pytest.raises(ChallengeFileError) as e: read_training_csv(path)
    assert str(e.value) == f"{path}: column 'Mass' is missing. Expected columns: {', '.join(HEADER)}"


def test_identifier_checks_after_dropping_unnamed_columns(tmp_path):
    header, rows = released_test()
    for r, c, v, expected in [(1, 2, ' ', "column 'PatientID': empty cell on line 3"),
                              (2, 0, 'img0001.png', "column 'ImageID': 'img0001.png' appears on lines 2, 4"),
                              (0, 1, '2016-01-01', "column 'StudyDate_DICOM': '2016-01-01' on line 2")]:
        bad = [list(x) for x in rows]
        bad[r][c] = v
        path = write_release(tmp_path / 'test.csv', header, bad, eol='\r\n', final_newline=False)
        with pytest.raises(ChallengeFileError) as e: read_test_csv(path)
        assert str(e.value).startswith(f'{path}: {expected}')
