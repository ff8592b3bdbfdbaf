"Build checks and the command line, run as users run them (subprocesses from the project's venv)."
import configparser, json, re, shlex, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args, cwd=ROOT, **kw):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, **kw)


@pytest.fixture
def project_copy(tmp_path):
    "The parts of the project that the notebook check reads, copied so they can be broken."
    for name in ['nbs', 'cxrlt', '.ci']:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    return tmp_path


def test_notebooks_match_package():
    r = run(sys.executable, ROOT / '.ci' / 'check_notebooks.py')
    assert r.returncode == 0, r.stdout + r.stderr


def test_unexported_edit_names_the_notebook(project_copy):
    nb_path = project_copy / 'nbs' / '01_labels.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and 'TASK2_CLASSES = [' in ''.join(c['source']))
    cell['source'] = [s.replace("'goiter'", "'goitre'") for s in cell['source']]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    r = run(sys.executable, project_copy / '.ci' / 'check_notebooks.py')
    assert r.returncode != 0
    assert 'cxrlt/labels.py: stale; export nbs/01_labels.ipynb' in r.stderr, r.stderr


def test_uncleaned_notebook_is_reported(project_copy):
    nb_path = project_copy / 'nbs' / '00_core.ipynb'
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb['cells'] if c['cell_type'] == 'code')
    code['execution_count'] = 42
    code['metadata'] = {'scrolled': True}
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    r = run(sys.executable, project_copy / '.ci' / 'check_notebooks.py')
    assert r.returncode != 0
    assert 'nbs/00_core.ipynb: not clean' in r.stderr, r.stderr


def test_labels_import_from_a_fresh_interpreter():
    r = run(sys.executable, '-c', 'import cxrlt.labels as l; print(len(l.CLASSES)); print("|".join(l.CLASSES))')
    count, names = r.stdout.splitlines()
    assert count == '30'
    assert names.split('|')[:3] == ['Normal', 'aortic elongation', 'cardiomegaly']
    assert names.split('|')[-2:] == ['sternotomy', 'calcified densities']


def test_console_script():
    cxrlt = BIN / 'cxrlt'
    r = run(cxrlt, '--version')
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    assert r.returncode == 0 and r.stdout.strip() == f"cxrlt {cfg['DEFAULT']['version']}"
    r = run(cxrlt, '--help')
    assert r.returncode == 0 and re.search(r'^\s+info\s', r.stdout, re.M), r.stdout
    r = run(cxrlt, 'info', '--help')
    assert r.returncode == 0 and '--classes' in r.stdout
    r = run(cxrlt, 'info', '--classes')
    assert r.returncode == 0 and 'Task 1 classes: 30' in r.stdout and '29 calcified densities' in r.stdout
    r = run(cxrlt, 'trian')
    assert r.returncode == 2 and "unknown command 'trian'" in r.stderr


def test_every_requirement_is_pinned():
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    reqs = shlex.split(cfg['DEFAULT']['requirements']) + shlex.split(cfg['DEFAULT']['dev_requirements'])
    names = {re.split(r'[<>=!~ \[]', r, maxsplit=1)[0].lower().replace('_', '-') for r in reqs}
    pins = {}
    for line in (ROOT / 'constraints.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            name, sep, version = line.partition('==')
            assert sep, f'constraints.txt: {line!r} is not an exact pin'
            pins[name.lower().replace('_', '-')] = version
    assert names - set(pins) == set(), f'not pinned in constraints.txt: {sorted(names - set(pins))}'
    assert (pins['torch'], pins['torchvision']) == ('2.14.1', '0.29.1')


def test_install_is_up_to_date():
    "After `make install`, a second one has nothing to do (so it returns in seconds)."
    r = run('make', '--question', 'install')
    assert r.returncode == 0, 'make install would run again: ' + r.stdout + r.stderr


def test_jupyter_kernel_is_registered():
    r = run(BIN / 'jupyter', 'kernelspec', 'list', '--json')
    specs = json.loads(r.stdout)['kernelspecs']
    assert 'cxrlt' in specs
    argv0 = specs['cxrlt']['spec']['argv'][0]
    assert Path(argv0).resolve().parent == BIN.resolve() or Path(argv0).parent == BIN, argv0
