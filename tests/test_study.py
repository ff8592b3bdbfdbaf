"The study as users run it: `cxrlt table` through papermill, failures, skips, submitit, and the site."
import json, re, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cxrlt(*args, **kw):
    return subprocess.run([str(BIN/'cxrlt'), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          **kw)


@pytest.fixture(scope='module')
def smoke_table(tmp_path_factory):
    "Rows 1 (made to fail while it trains: its loss overflows), 3 and 4 (cRT on 3) of the smoke preset."
    out = tmp_path_factory.mktemp('table')
    broken = json.dumps({'1': {'lr': 1e30}})
    r = cxrlt('table', '--preset', 'smoke', '--rows', '1,3,4', '--out', out, '--overrides', broken)
    return out, r


def test_failing_row_is_recorded_and_others_finish(smoke_table):
    out, r = smoke_table
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'row  1: failed' in r.stdout and 'done: rows 3, 4' in r.stdout, r.stdout
    assert 'best row on dev: ' in r.stdout and 'claims of the paper: on the results page' in r.stdout, r.stdout
    err = json.loads((out/'rows'/'row01'/'error.json').read_text())
    assert 'loss is nan at batch' in err['error'], err['error']
    assert 'FloatingPointError' in err['traceback'] and 'Traceback' in err['traceback'], err['traceback'][-2000:]
    assert (out/'rows'/'row01'/'train_row.ipynb').exists()  # the executed notebook is the record
    res = pd.read_csv(out/'results.csv')
    assert set(res.row) == {3, 4}
    assert {'AP', 'AUC', 'F1', 'ECE'} <= set(res.metric)
    assert res[(res.split == 'val') & (res.metric == 'AP')].ci_low.notna().all()
    dev = res[(res.split == 'dev') & (res.metric == 'AP')]   # every row is scored on the held-out dev patients
    assert sorted(dev.row) == [3, 4] and dev.ci_low.notna().all()
    r3 = json.loads((out/'rows'/'row03'/'result.json').read_text())
    assert r3['best_epoch_phase'] in ('before DRW', 'after DRW') and r3['drw_start_epoch'] == 1


def test_claims_are_tested_on_dev(smoke_table):
    "The one claim rows 3 and 4 can test (cRT improves LDAM-DRW), on dev, with a finite interval around the difference."
    from cxrlt.claims import paper_claims, table_headline
    out, _ = smoke_table
    c = paper_claims(out, n_bootstrap=20)
    assert c['rows'].tolist() == ['4 vs 3'] and c['metric'].tolist() == ['AP']
    assert c.ci_low[0] <= c['ours Δ'][0] <= c.ci_high[0] and c.verdict[0] in ('holds', 'contradicted', 'inconclusive')
    on_val = paper_claims(out, n_bootstrap=20, split='val')
    assert on_val['ours Δ'][0] != c['ours Δ'][0]   # dev and val are other patients
    decided = int(c.verdict[0] in ('holds', 'contradicted'))
    assert f'claims of the paper decided on dev: {decided} of 1 ' in table_headline(out)


def test_bad_inputs_stop_the_table_before_any_row_trains(smoke_table, tmp_path):
    "Every problem of every row at once (a bad loss option in row 1, a missing weights file in row 3), nothing run."
    out, _ = smoke_table
    bad = json.dumps({'1': {'loss_kwargs': {'no_such_option': 1}}, '3': {'pretrained_path': str(tmp_path/'w.pt')}})
    r = cxrlt('table', '--preset', 'smoke', '--rows', '1,3', '--out', tmp_path/'t', '--overrides', bad)
    assert r.returncode == 2, r.stdout + r.stderr
    assert '2 problem(s) with its inputs' in r.stderr and "row 1: loss: loss 'bce' does not take" in r.stderr
    assert f"row 3: pretrained_path: {tmp_path/'w.pt'} is not a file" in r.stderr, r.stderr
    assert not (tmp_path/'t'/'rows').exists() and not (tmp_path/'t'/'runs').exists()


def test_rerun_skips_finished_rows(smoke_table):
    out, _ = smoke_table
    before = (out/'rows'/'row03'/'result.json').stat().st_mtime_ns
    r = cxrlt('table', '--preset', 'smoke', '--rows', '3,4', '--out', out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'skipped: rows 3, 4' in r.stdout, r.stdout
    assert (out/'rows'/'row03'/'result.json').stat().st_mtime_ns == before


def test_row_hash_ignores_which_rows_run_and_how_many_at_once(smoke_table):
    "A row is reused when another selection of rows or another number of workers runs; a recipe change reruns it."
    import dataclasses
    from cxrlt.presets import get_preset
    from cxrlt.study import _refit, row_parameters, table_data
    out, _ = smoke_table
    p = get_preset('smoke')
    data = table_data(p, out, progress=False)
    h = lambda q: row_parameters(3, q, data, out)['hash']
    stored = json.loads((out/'rows'/'row03'/'result.json').read_text())['hash']
    assert h(p) == h(dataclasses.replace(p, rows=(3,), workers=4)) == stored
    assert h(dataclasses.replace(p, epochs=p.epochs + 1)) != stored
    with pytest.raises(ValueError, match="unknown refit step 'bogus'"):
        _refit('bogus', out/'rows'/'row03'/'none.csv', [], out)


def test_submitit_local_runs_dependent_rows(smoke_table, tmp_path):
    from cxrlt.study import run_table
    s = run_table('smoke', [4], executor='submitit-local', out=tmp_path/'t', progress=False)
    assert s['failed'] == []
    assert [s['rows'][r]['status'] for r in ('3', '4')] == ['done', 'done']
    assert all('job_id' in s['rows'][r] for r in ('3', '4'))
    r3 = json.loads((tmp_path/'t'/'rows'/'row03'/'result.json').read_text())
    r4 = json.loads((tmp_path/'t'/'rows'/'row04'/'result.json').read_text())
    assert r4['run_dirs'] == r3['run_dirs']  # cRT reused row 3's training


def repository_files() -> list:
    "`git status` of the checkout, ignored files included (byte-code caches aside)."
    r = subprocess.run(['git', 'status', '--porcelain', '--ignored'], cwd=ROOT, capture_output=True, text=True,
                       check=True)
    return [line for line in r.stdout.splitlines() if '__pycache__' not in line]


SITE_PAGE_CHECKS = """() => {
  const text = document.body.innerText, prose = document.body.cloneNode(true);
  prose.querySelectorAll('pre, code, script, style').forEach(e => e.remove());
  return {text, math: document.querySelectorAll('math').length, rawMath: /\\$[^$\\s][^$\\n]*\\$/.test(prose.innerText),
          images: [...document.images].map(i => [i.naturalWidth, i.naturalHeight]),
          nav: [...document.querySelectorAll('nav.cxrlt-nav a')].map(a => a.href),
          tables: [...document.querySelectorAll('table')].map(t => t.innerText.slice(0, 400))};
}"""


def test_site_in_chromium(smoke_table, tmp_path, tmp_path_factory, capfd):
    """The static site from nbdev's processed notebooks, opened from disk in Chromium: every page of `_quarto.yml`
    loads with no console error and no request off the disk, math typeset, images drawn, no directive or prompt,
    every navigation link resolves, and the home page shows the table (the repository is not touched)."""
    from playwright.sync_api import sync_playwright
    from conftest import artifacts_dir, launch_chromium, watch_page
    from cxrlt.site import build_site, chapter_sources, quarto_pages, screenshot_pages
    from cxrlt.study import run_table
    out, _ = smoke_table
    assert yaml.safe_load((ROOT/'_quarto.yml').read_text())['project']['type'] == 'website'
    with pytest.MonkeyPatch.context() as mp:   # as `make ceiling` makes it: one row trained longer on the same data,
        mp.chdir(out)                          # named by a path relative to where the command runs
        ceiling = run_table('smoke', [3], data='data/synthetic-tiny', out='ceiling', overrides={3: {'epochs': 3}},
                            progress=False)
    assert ceiling['failed'] == [], ceiling['rows']
    before = repository_files()
    build, site = tmp_path/'build', tmp_path/'site'
    page, problems = build_site(out, ROOT, n_bootstrap=20, use_quarto=False, build_dir=build, site_dir=site,
                                execute={'06_metrics.ipynb', '09_cam.ipynb'}, progress=False)
    assert page == site/'index.html' and problems == {}, problems
    listed = quarto_pages(build, ROOT)
    assert len(listed) == len(chapter_sources(ROOT)) + 3, listed   # chapters and guide, home, API, results
    pages = sorted(p.relative_to(site).as_posix() for p in site.glob('*.html'))
    assert len(pages) == len(listed) and {'index.html', 'guide.html', 'api.html', 'results.html', 'metrics.html'} <= \
        set(pages), pages
    html = (site/'results.html').read_text()
    assert "Our table beside the paper" in html and 'data:image/png;base64' in html
    assert 'def ' not in html and 'import ' not in html   # the results page shows outputs, not code
    assert re.search(r'Ceiling reference \(dashed\): row 3 trained for 3 epochs against the table.{1,6}s 2 .*'
                     r'dev mAP 0\.\d{3}, AUC 0\.\d{3}; '
                     r'the same split', html)
    assert re.search(r'row [34] dev AUC</th>', html) and 'How hard each class is' in html
    assert 'holds' in html or 'inconclusive' in html or 'contradicted' in html   # the claims' verdicts in words
    shots = artifacts_dir(tmp_path_factory)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        view = browser.new_page(viewport={'width': 1400, 'height': 1000})
        errors, off_disk = watch_page(view), []
        view.on('request', lambda r: r.url.startswith(('file:', 'data:')) or off_disk.append(r.url))
        for name in pages:
            errors.clear()
            view.goto((site/name).as_uri())
            view.wait_for_load_state('load')
            got = view.evaluate(SITE_PAGE_CHECKS)
            assert errors == [] and off_disk == [], (name, errors, off_disk)
            # no directive line (`#| ...` opening a line; 12_site's prose and tests name them inside lines) or prompt
            assert not re.search(r'(?m)^\s*#\| ', got['text']) and not re.search(r'In \[\d*\s*\]:', got['text']), name
            assert all(w > 0 and h > 0 for w, h in got['images']), (name, got['images'])
            assert not got['rawMath'], f'{name}: math left as $...$'
            assert got['nav'] and all(Path(h.removeprefix('file://')).exists() for h in got['nav']), (name, got['nav'])
            if name == 'metrics.html': assert got['math'] > 10 and got['images'], got['math']
            if name == 'index.html':
                assert any('paper AP' in t and 'ours AP' in t for t in got['tables']), got['tables']
                assert 'best row on dev' in got['text'], got['text'][:500]
        browser.close()
    from PIL import Image
    taken = screenshot_pages(site, shots)
    assert [p.name for p in taken] == ['site-home.png', 'site-results.png']
    assert all(Image.open(p).size[0] == 1400 and Image.open(p).size[1] > 900 for p in taken)
    assert repository_files() == before, 'building the site into temporary folders changed the repository'
    assert 'running over TCP' not in capfd.readouterr().err   # the kernels talk over local sockets


def test_site_says_when_a_table_cannot_be_shown(smoke_table, tmp_path):
    "A table with no finished row, or whose results notebook fails, gives a page that says so, not a traceback."
    import shutil
    from cxrlt.site import results_page
    out, _ = smoke_table
    empty = tmp_path/'empty'
    empty.mkdir()
    (empty/'table.json').write_text(json.dumps({'preset': 'smoke', 'rows': {}}))
    build = tmp_path/'build'
    build.mkdir()
    assert results_page(empty, ROOT, build) == f'{empty} has no finished row'
    page = (build/'results.ipynb').read_text()
    assert 'has no finished row yet' in page and 'Traceback' not in page
    broken = tmp_path/'broken'
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns('runs', 'data', 'ceiling'))
    (broken/'table.json').unlink()   # the results notebook reads it first
    error = results_page(broken, ROOT, build, n_bootstrap=5)
    assert error and 'table.json' in error, error
    page = (build/'results.ipynb').read_text()
    assert 'could not be built' in page and 'table.json' in page and 'Traceback' not in page
    assert (build/'results-failed.ipynb').exists()


def test_recipe_add_a_row(smoke_table, tmp_path, monkeypatch):
    "CONTRIBUTING's recipe: one `register_row` line adds a row (here in a temporary registry) that `run_table` runs."
    import shutil
    from cxrlt import study
    from cxrlt.presets import PRESETS
    monkeypatch.setattr(study, 'ROWS', dict(study.ROWS))
    study.register_row(31, 'ResNet-50', 'ldam_drw', post_training='cRT+TTA', base_rows=[3])
    study.register_row(32, 'ResNet-50', 'asl', backbone='resnet50')
    assert study.row_plan([31]) == [3, 31]
    c = study.training_config(32, PRESETS['smoke'], {k: None for k in (
        'train_csv', 'train_cache', 'removal_csv', 'test_csv', 'test_cache', 'test_labels_csv')}, tmp_path)
    assert (c['backbone'], c['loss'], c['head'], c['drw_start_epoch']) == ('resnet10t', 'asl', 'linear', None)
    table, _ = smoke_table
    try:
        s = study.run_table('smoke', [31], out=table, progress=False)
        assert s['failed'] == [] and s['rows']['3']['status'] == 'skipped' and s['rows']['31']['status'] == 'done'
        r31 = json.loads((table/'rows'/'row31'/'result.json').read_text())
        r3 = json.loads((table/'rows'/'row03'/'result.json').read_text())
        assert r31['run_dirs'] == r3['run_dirs'] and r31['post_training'] == 'cRT+TTA'
        assert 31 in set(pd.read_csv(table/'results.csv').row)
    finally:  # leave the shared table as the other tests expect it
        shutil.rmtree(table/'rows'/'row31', ignore_errors=True)
        study.collect_results(table)


def test_dry_run_plans_the_paper_table_without_training(tmp_path):
    "A replica of the release (names, Removal.csv) and a throughput file: the plan's hours follow from the counts."
    from conftest import tiny_challenge
    from cxrlt.models import paper_backbones
    d = tiny_challenge(tmp_path/'release', n_train=96, n_test=24)
    (d/'train.csv').rename(d/'CXRLT_2026_training.csv')
    (d/'test.csv').rename(d/'CXRLT_2026_TEST_ALL_TASK1.csv')
    (d/'Removal.csv').write_text('ImageID,StudyDate_DICOM,PatientID\n' + '\n'.join(
        f'img{i:04d}.png,20200101,{i + 1}.00E+30' for i in range(6)))          # three columns, no final newline
    names = [b.name for b in paper_backbones()]
    report = {'results': [{'model': n, 'size': 512, 'status': 'ok', 'img_s': 100.0} for n in names[1:]]}
    (tmp_path/'throughput.json').write_text(json.dumps(report))
    r = cxrlt('table', '--preset', 'paper', '--data', d, '--dry-run', '--throughput', tmp_path/'throughput.json')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'paper preset: 20 rows, 10 trainings, 72 images per epoch' in r.stdout, r.stdout
    from cxrlt.plan import table_plan
    plan = table_plan('paper', data=d, throughput=tmp_path/'throughput.json')
    n_train, n_val, n_eval = round(90 * 0.8), round(90 * 0.1), round(90 * 0.1) * 2 + 24   # 96 images less 6 removed
    hours = (20 * (n_train / 100 + n_val / 300) + n_eval / 300) / 3600
    trained = plan[plan.trains & plan.img_per_s.notna() & (plan.index != 20)]
    assert len(trained) and all(abs(h - hours) < 1e-12 for h in trained.gpu_hours)
    sam = (20 * (2 * n_train / 100 + n_val / 300) + n_eval / 300) / 3600   # row 20: two passes per SAM step
    assert abs(plan.gpu_hours[20] - sam) < 1e-12
    assert (plan.gpu_hours[[18, 19]] == 0).all()   # thresholds and temperatures refit a predictions file
    assert plan[plan.backbone == names[0]].gpu_hours.isna().all()   # no throughput for it: unknown, not zero
    assert 'have no throughput' in r.stdout
    r = cxrlt('table', '--preset', 'paper', '--data', d, '--dry-run')   # no throughput for any backbone
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'images per epoch; no estimate: no backbone has a throughput' in r.stdout, r.stdout


def test_local_pool_runs_rows_at_once(smoke_table, tmp_path):
    """workers=2: two training rows run side by side (their runs overlap in time) and give what one by one gave;
    rows 4 and 5 (cRT and cRT+TTA on row 3) share row 3's feature cache and run one after the other."""
    from cxrlt.study import run_table
    out, _ = smoke_table
    s = run_table('smoke', rows=[2, 3, 4, 5], out=tmp_path/'pool', workers=2, progress=False)
    assert s['workers'] == 2 and [st['status'] for st in s['rows'].values()] == ['done'] * 4, s
    row_times = [json.loads((tmp_path/'pool'/'rows'/f'row0{r}'/'result.json').read_text()) for r in (4, 5)]
    assert all('predictions' in t for t in row_times)
    times = [json.loads(m.read_text()) for m in sorted((tmp_path/'pool'/'runs').glob('row0[23]-*/manifest.json'))]
    start, end = ([pd.Timestamp(t[k]) for t in times] for k in ('start_time', 'end_time'))
    assert start[0] < end[1] and start[1] < end[0], times   # the two runs overlap
    ours, alone = (json.loads((d/'rows'/'row03'/'result.json').read_text())['metrics'] for d in (tmp_path/'pool', out))
    assert ours['dev']['mAP'] == pytest.approx(alone['dev']['mAP'], abs=1e-6)


def test_bad_worker_count_is_refused_before_anything_runs(tmp_path):
    from cxrlt.study import run_table
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match='workers must be a whole number >= 1'):
            run_table('smoke', rows=[1], out=tmp_path/'t', workers=bad, progress=False)
    assert not (tmp_path/'t').exists()
