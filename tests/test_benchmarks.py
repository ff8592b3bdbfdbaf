"benchmarks/: the GPU throughput script's CPU smoke run writes the JSON and markdown it promises, with sane numbers."
import json, math, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {'benchmark', 'schema_version', 'complete', 'created', 'command', 'device', 'host', 'versions', 'settings',
            'flops_source', 'peak', 'loader', 'budget', 'results'}
ROW_KEYS = {'model', 'timm_name', 'paper_name', 'size', 'status', 'note', 'batch_size', 'warmup_steps', 'timed_steps',
            'timed_s', 'img_s', 'step_ms', 'first_step_s', 'compile', 'fwd_gflops_per_image', 'train_tflops', 'mfu',
            'peak_memory_gib', 'max_batch', 'max_batch_limited_by', 'seconds'}
POSITIVE = ('batch_size', 'timed_steps', 'timed_s', 'img_s', 'step_ms', 'first_step_s', 'fwd_gflops_per_image',
            'train_tflops', 'mfu', 'max_batch', 'seconds')


def positive(v) -> bool: return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    "The JSON report and markdown page of one `--cpu-smoke` run."
    out = tmp_path_factory.mktemp('gpu_throughput')
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'gpu_throughput.py'), '--cpu-smoke', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out/'throughput.json').read_text()), (out/'throughput.md').read_text(), r.stdout


def test_report_shape(smoke):
    report, _, _ = smoke
    assert set(report) == TOP_KEYS
    assert report['benchmark'] == 'gpu_throughput' and report['complete'] is True
    assert report['device']['type'] == 'cpu' and report['versions']['torch']
    s = report['settings']
    assert s['cpu_smoke'] is True and s['compile'] == 'off' and s['models'] == ['resnet10t']
    assert s['sizes'] == [64, 32] and s['batch_sizes'] == {'64': 8, '32': 32}   # same pixels per step
    assert s['device_transform_used'] in ('cxrlt.datasets.DeviceAugment', 'cxrlt.datasets.normalize_batch')
    assert report['budget']['skipped'] == 0 and report['budget']['failed'] == 0
    assert 0 < report['budget']['used_s'] <= s['hard_limit_s']


def test_every_measurement_is_finite_and_positive(smoke):
    report, _, _ = smoke
    assert positive(report['peak']['tflops']) and report['peak']['dtype'] == 'float32'
    assert [r['size'] for r in report['loader']] == [64, 32] and all(positive(r['img_s']) for r in report['loader'])
    rows = report['results']
    assert [(r['model'], r['size']) for r in rows] == [('resnet10t', 64), ('resnet10t', 32)]
    for r in rows:
        assert set(r) == ROW_KEYS and r['status'] == 'ok', r
        bad = {k: r[k] for k in POSITIVE if not positive(r[k])}
        assert not bad, bad
        assert r['peak_memory_gib'] is None          # no device memory to report on the CPU
        assert r['max_batch'] >= r['batch_size'] and r['max_batch_limited_by'] in ('oom', 'cap', 'budget')
        assert r['compile'] == 'off' and r['timed_steps'] >= 3


def test_numbers_follow_their_definitions(smoke):
    "images/s from steps x batch / time; training FLOPs = 3 x forward; MFU against the measured peak."
    report, _, _ = smoke
    peak = report['peak']['tflops']
    for r in report['results']:
        assert r['img_s'] == pytest.approx(r['timed_steps'] * r['batch_size'] / r['timed_s'], rel=1e-9)
        assert r['step_ms'] == pytest.approx(1000 * r['timed_s'] / r['timed_steps'], rel=1e-9)
        assert r['train_tflops'] == pytest.approx(3 * r['fwd_gflops_per_image'] * r['img_s'] / 1000, rel=1e-9)
        assert r['mfu'] == pytest.approx(r['train_tflops'] / peak, rel=1e-9)
    # a convolutional network's forward FLOPs grow with the pixels: 4x from 32 to 64 px (the 30-way head aside)
    g = {r['size']: r['fwd_gflops_per_image'] for r in report['results']}
    assert g[64] / g[32] == pytest.approx(4, rel=0.01)


def test_markdown_and_progress(smoke):
    report, md, stdout = smoke
    assert md.startswith('# Training throughput on ')
    table = [ln for ln in md.splitlines() if ln.startswith('| resnet10t |')]
    assert len(table) == 2 and all(' n/a ' in ln for ln in table)    # peak memory is n/a on the CPU
    assert '| model | size | batch | img/s |' in md
    assert sum('resnet10t @ ' in ln and 'img/s' in ln for ln in stdout.splitlines()) == 2   # one line a measurement
