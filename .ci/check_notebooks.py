"""Fail when `nbdev_export` or `nbdev_clean` would change a committed file.

Both tools run on a temporary copy of `nbs/`, `cxrlt/` and `settings.ini`, so the working tree is
never modified; every stale module is reported with the notebook it is exported from."""
import filecmp, re, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent
ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '.ipynb_checkpoints')


def files(d: Path, pattern: str) -> set:
    skip = {'__pycache__', '.ipynb_checkpoints'}
    return {p.relative_to(d) for p in d.rglob(pattern) if not skip & set(p.parts)}


def source_notebook(module: Path) -> str:
    m = re.search(r'File to edit: (\S+)', module.read_text(encoding='utf-8')[:500]) if module.exists() else None
    return str((module.parent / m.group(1)).resolve().relative_to(module.parent.parent.resolve())) if m else '?'


def changed(old: Path, new: Path, pattern: str) -> list:
    rels = files(old, pattern) | files(new, pattern)
    same = lambda r: (old / r).exists() and (new / r).exists() and filecmp.cmp(old / r, new / r, shallow=False)
    return sorted(r for r in rels if not same(r))


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for name in ['nbs', 'cxrlt']:
        shutil.copytree(root / name, tmp / name, ignore=ignore)
    shutil.copy(root / 'settings.ini', tmp)
    for tool in ['nbdev_clean', 'nbdev_export']:
        r = subprocess.run([str(bin_dir / tool)], cwd=tmp, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f'{tool} failed:\n{r.stdout}{r.stderr}')
    problems = []
    for rel in changed(root / 'nbs', tmp / 'nbs', '*.ipynb'):
        problems.append(f'nbs/{rel}: not clean; run `nbdev_clean` (or save it with the nbdev hooks) and commit it')
    for rel in changed(root / 'cxrlt', tmp / 'cxrlt', '*.py'):
        produced, committed = (tmp / 'cxrlt' / rel).exists(), (root / 'cxrlt' / rel).exists()
        nb = source_notebook(tmp / 'cxrlt' / rel) if produced else source_notebook(root / 'cxrlt' / rel)
        what = 'missing' if not committed else 'stale' if produced else 'not produced by any notebook'
        problems.append(f'cxrlt/{rel}: {what}; export {nb} with `nbdev_export` and commit the module')
    if problems:
        sys.exit('Notebooks and package disagree:\n  ' + '\n  '.join(problems))
print('notebooks clean and cxrlt/ matches nbdev_export')
