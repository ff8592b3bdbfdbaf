"The paper's future work as rows 18-20 (per-class thresholds and temperatures, SAM), run by `cxrlt table`."
import json

import numpy as np
import pandas as pd
import pytest

from cxrlt.cli import main


@pytest.fixture(scope='module')
def future(tmp_path_factory):
    out = tmp_path_factory.mktemp('future')
    assert main(['table', '--preset', 'smoke', '--rows', '18,19,20', '--out', str(out)]) == 0
    return out, pd.read_csv(out/'results.csv')


def dev(results, row, metric):
    r = results[(results.row == row) & (results.split == 'dev') & (results.metric == metric)]
    return float(r.value.iloc[0])


def test_the_rows_and_their_base_run(future):
    out, results = future
    assert {15, 18, 19, 20} <= set(results.row)
    r18, r19 = (json.loads((out/'rows'/f'row{n:02d}'/'result.json').read_text()) for n in (18, 19))
    r15 = json.loads((out/'rows'/'row15'/'result.json').read_text())
    assert r18['run_dirs'] == r19['run_dirs'] == r15['run_dirs']   # both refit row 15's predictions


def test_monotone_maps_keep_what_they_must(future):
    "A per-class threshold shift keeps AP and AUC; a per-class temperature keeps AP, AUC and F1 at 0.5 (same sign)."
    _, results = future
    for metric in ('AP', 'AUC'):
        assert abs(dev(results, 18, metric) - dev(results, 15, metric)) < 1e-9, metric
        assert abs(dev(results, 19, metric) - dev(results, 15, metric)) < 1e-9, metric
    assert abs(dev(results, 19, 'F1') - dev(results, 15, 'F1')) < 1e-9
    assert dev(results, 19, 'ECE') != dev(results, 15, 'ECE')


def test_thresholds_are_fitted_on_val_only(future):
    out, _ = future
    p = pd.read_csv(out/'rows'/'row18'/'thresholds-f1.csv')
    meta = json.loads((out/'rows'/'row18'/'thresholds-f1.json').read_text())['params']
    assert meta['fitted_on'] == 'val' and set(p.split) >= {'val', 'dev'}
    th = np.array(list(meta['thresholds'].values()))
    assert ((th > 0) & (th < 1)).all()


def test_sam_row_trains_with_sam(future):
    out, results = future
    (run,) = [p for p in (out/'runs').iterdir() if p.name.startswith('row20-')]
    manifest = json.loads((run/'manifest.json').read_text())
    assert manifest['params']['sam_rho'] == 0.05 and manifest['status'] == 'completed'
    assert dev(results, 20, 'AP') != dev(results, 15, 'AP')   # another training than row 15
