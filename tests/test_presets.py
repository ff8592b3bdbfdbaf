"""The `faithful` preset (the paper's public code) as users run it: `cxrlt table --preset faithful --scale smoke`, each
of its choices checked against an independent reference, and its GPU plan from `--dry-run`."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlt.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def faithful(tmp_path_factory):
    "Rows 1 (ResNet-50, BCE), 3 (ResNet-50, LDAM-DRW) and 4 (cRT on 3) of the faithful recipe on the smoke data."
    out = tmp_path_factory.mktemp('faithful')
    assert main(['table', '--preset', 'faithful', '--scale', 'smoke', '--rows', '1,3,4', '--out', str(out)]) == 0
    return out


def manifest(out:Path, row:int) -> dict:
    (run,) = (out/'runs').glob(f'row{row:02d}-*')
    return json.loads((run/'manifest.json').read_text())


def test_rows_train_the_recipe(faithful):
    "Batch 12, lr 1e-4, early stopping, no augmentation; LDAM-DRW as coded over a plain linear head."
    out = faithful
    for row in (1, 3):
        m = manifest(out, row)
        p = m['params']
        assert m['status'] == 'completed'
        assert (p['batch_size'], p['lr'], p['patience']) == (12, 1e-4, 3)
        off = {'hflip': 0.0, 'degrees': 0.0, 'translate': 0.0, 'scale': [1.0, 1.0], 'brightness': 0.0, 'contrast': 0.0,
               'clahe': 0.0, 'noise': 0.0, 'dropout': 0.0}
        assert {k: p['augment'][k] for k in off} == off
    p3 = manifest(out, 3)['params']
    assert (p3['loss'], p3['head'], p3['drw_start_epoch']) == ('ldam_drw_as_coded', 'linear', 1)
    assert manifest(out, 1)['params']['loss'] == 'bce'
    results = pd.read_csv(out/'results.csv')
    assert set(results.row) == {1, 3, 4} and set(results.preset) == {'faithful@smoke'}
    assert json.loads((out/'table.json').read_text())['preset'] == 'faithful@smoke'


def test_augmentation_off_is_the_identity():
    "The recipe's augmentation leaves every batch as it is (the pipeline it builds has no step)."
    import torch
    from cxrlt.datasets import AugmentConfig, train_augmentation
    from cxrlt.presets import PRESETS
    aug = train_augmentation(AugmentConfig.from_dict(PRESETS['faithful'].augment, source='faithful'))
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(aug(x), x)


def test_caches_divide_16_bit_pngs_by_65535(faithful):
    "The caches hold each 16-bit PNG divided by 65535 (computed here from the file's integers), resized and quantised."
    from cxrlt.cache import open_cache
    from cxrlt.images import percentile_window, resize_square, to_uint8
    out = faithful
    (cache_dir,) = (out/'data').glob('cache-train-32-*')
    assert json.loads((cache_dir/'cache.json').read_text())['windowing'] == 'fixed'
    cache = open_cache(cache_dir)
    images = out/'data'/'synthetic-tiny'/'images'
    for image_id in cache.image_ids[:3]:
        (path,) = images.rglob(image_id)
        with Image.open(path) as im: stored = np.asarray(im).astype(np.float64)
        assert stored.max() > 255                     # 16-bit values, not 8-bit
        expected = to_uint8(resize_square(stored / 65535.0, 32))
        assert np.array_equal(cache[image_id], expected), image_id
        default = to_uint8(resize_square(percentile_window(stored), 32))   # the 'auto' windowing of the other presets
        assert not np.array_equal(cache[image_id], default)


def test_weights_are_torchvisions_imagenet_1k():
    "The paper's backbones load timm's copies of torchvision's ImageNet-1k weights (ConvNeXt: timm's ImageNet-1k)."
    from timm.models import get_pretrained_cfg
    from cxrlt.models import resolve_model_name
    from cxrlt.presets import PRESETS
    from cxrlt.study import ROWS, row_backbone
    p = PRESETS['faithful']
    names = {r: resolve_model_name(row_backbone(ROWS[r], p)) for r in p.rows if ROWS[r].trains}
    assert names[1] == 'resnet50.tv_in1k' and names[6] == 'resnet101.tv_in1k' and names[15] == 'convnext_large.fb_in1k'
    for r, name in names.items():
        cfg = get_pretrained_cfg(name)
        assert cfg.num_classes == 1000, (r, name)            # ImageNet-1k heads: no 22k pre-training step
        assert 'in22k' not in name and 'in21k' not in name
    for name in ('resnet50.tv_in1k', 'resnet101.tv_in1k'):
        assert 'pytorch/vision' in get_pretrained_cfg(name).origin_url   # torchvision's weights


def test_results_page_and_explorer_show_the_rows(faithful, tmp_path):
    from cxrlt.site import results_page
    out = faithful
    build = tmp_path/'build'
    build.mkdir()
    assert results_page(out, ROOT, build, n_bootstrap=5) is None
    page = (build/'results.ipynb').read_text()
    assert 'faithful@smoke' in page
    assert main(['cam', '--run', str(out/'runs'), '--n_images', '1', '--classes', 'cardiomegaly', '--device', 'cpu',
                 '--out', str(tmp_path/'cam')]) == 0
    cams = pd.read_csv(tmp_path/'cam'/'cams.csv')
    assert {m.split('-')[0] for m in cams.model} == {'row01', 'row03'}


def test_dry_run_prints_the_faithful_gpu_plan(tmp_path, capsys):
    "17 rows at 512 px with torchvision's weights, LDAM-DRW as coded, 15 epochs; nothing trains."
    from conftest import tiny_challenge
    d = tiny_challenge(tmp_path/'release', n_train=96, n_test=24)
    (d/'train.csv').rename(d/'CXRLT_2026_training.csv')
    (d/'test.csv').rename(d/'CXRLT_2026_TEST_ALL_TASK1.csv')
    assert main(['table', '--preset', 'faithful', '--data', str(d), '--dry-run', '--img_per_s', '50']) == 0
    text = capsys.readouterr().out
    assert 'faithful preset: 17 rows, 9 trainings' in text, text
    assert 'resnet50.tv_in1k' in text and 'ldam_drw_as_coded' in text and 'convnext_large.fb_in1k' in text
    from cxrlt.plan import table_plan
    plan = table_plan('faithful', data=d, img_per_s=50)
    assert set(plan.epochs[plan.trains]) == {15} and not (tmp_path/'release'/'runs').exists()


# ---------------------------------------------------------------- strong: the CXR-LT 2026 winner's recipe
@pytest.fixture(scope='module')
def strong(tmp_path_factory):
    "The strong recipe's rows (21: ConvNeXtV2 proxy, logit-adjusted BCE; 22: TTA and Normal gating) on smoke data."
    out = tmp_path_factory.mktemp('strong')
    assert main(['table', '--preset', 'strong', '--scale', 'smoke', '--out', str(out)]) == 0
    return out


def test_strong_row_trains_the_recipe(strong):
    out = strong
    m = manifest(out, 21)
    p = m['params']
    assert m['status'] == 'completed'
    assert (p['backbone'], p['loss'], p['ema_decay'], p['sampler']) == ('convnextv2_atto', 'logit_adjusted_bce', 0.9998,
                                                                        'repeat_factor')
    assert (p['augment']['clahe'], p['augment']['noise'], p['augment']['dropout']) == (0.5, 0.02, 0.5)
    assert p['augment']['hflip'] == 0.5 and p['augment']['degrees'] == 10.0
    (cache_dir,) = (out/'data').glob('cache-train-32-*')
    assert json.loads((cache_dir/'cache.json').read_text())['windowing'] == 'percentile'
    results = pd.read_csv(out/'results.csv')
    assert set(results.row) == {21, 22} and set(results.preset) == {'strong@smoke'}


def test_strong_post_training_is_logit_tta_then_gating_fitted_on_val(strong):
    "Row 22: six views of row 21's model averaged in logit space, then p_c·(1 − p_Normal)^α with α chosen on val."
    from scipy.special import expit, log_expit
    from cxrlt.labels import CLASSES
    from cxrlt.posttrain import log_odds, read_predictions
    from cxrlt.presets import STRONG_TTA_VIEWS
    out = strong
    d = out/'rows'/'row22'
    tta = json.loads((d/'tta.json').read_text())['params']
    assert tta['views'] == list(STRONG_TTA_VIEWS) and tta['merge'] == 'logit' and len(tta['views']) == 6
    gating = json.loads((d/'normal-gating.json').read_text())['params']
    alpha = gating['alpha']
    grid = [round(a, 1) for a in np.arange(0, 4.0001, 0.1)]   # 0, 0.1, ..., 4.0
    assert gating['fitted_on'] == 'val' and alpha in grid
    tta_frame = read_predictions(d/'tta.csv')
    ell = log_odds(tta_frame)
    gated = read_predictions(d/'normal-gating.csv')[CLASSES].to_numpy()
    n = CLASSES.index('Normal')

    def gate(ell, a):   # p_c (1 - p_Normal)^alpha, by hand in float64; Normal itself unchanged
        p = expit(ell)
        q = p * np.exp(a * log_expit(-ell[:, [n]]))
        q[:, n] = p[:, n]
        return q
    np.testing.assert_allclose(gated, gate(ell, alpha), rtol=0, atol=1e-9)
    # alpha is the grid's first best validation macro AP, recomputed with scikit-learn
    from sklearn.metrics import average_precision_score
    val = (tta_frame.split == 'val').to_numpy()
    train = pd.read_csv(next((out/'data').glob('synthetic-*'))/'CXRLT_2026_training.csv').set_index('ImageID')
    y = train.loc[tta_frame.ImageID[val], CLASSES].to_numpy()
    aps = np.array([np.mean([average_precision_score(y[:, c], q[:, c]) for c in range(len(CLASSES)) if y[:, c].any()])
                    for q in (gate(ell[val], a) for a in grid)])
    assert alpha == grid[int(np.flatnonzero(aps >= aps.max() - 1e-9)[0])], (alpha, aps.round(4))
    r22 = json.loads((d/'result.json').read_text())
    assert r22['predictions'].endswith('normal-gating.csv')


def test_repeat_factor_sampler_shards_one_draw_over_ranks():
    "Under DDP each rank takes its share of the same epoch's draw: together they are the single-process draw."
    from cxrlt.samplers import RepeatFactorSampler
    y = (np.random.default_rng(0).random((200, 30)) < 0.05).astype(int)
    one = list(RepeatFactorSampler(y, num_samples=300, seed=3))
    parts = [list(RepeatFactorSampler(y, num_samples=300, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert parts[0] == one[0::2] and parts[1] == one[1::2] and len(set(one)) < len(one)   # repeats, split by rank


def test_strong_results_page_and_explorer(strong, tmp_path):
    from cxrlt.site import results_page
    build = tmp_path/'build'
    build.mkdir()
    assert results_page(strong, ROOT, build, n_bootstrap=5) is None
    page = (build/'results.ipynb').read_text()
    assert 'ConvNeXtV2-Base' in page and 'TTA+gating' in page and "winner's recipe" in page
    assert main(['cam', '--run', str(strong/'runs'), '--n_images', '1', '--classes', 'cardiomegaly', '--device', 'cpu',
                 '--out', str(tmp_path/'cam')]) == 0
    assert {m.split('-')[0] for m in pd.read_csv(tmp_path/'cam'/'cams.csv').model} == {'row21'}


def test_dry_run_prints_the_strong_gpu_plan(tmp_path, capsys):
    from conftest import tiny_challenge
    d = tiny_challenge(tmp_path/'release', n_train=96, n_test=24)
    (d/'train.csv').rename(d/'CXRLT_2026_training.csv')
    (d/'test.csv').rename(d/'CXRLT_2026_TEST_ALL_TASK1.csv')
    assert main(['table', '--preset', 'strong', '--data', str(d), '--dry-run', '--img_per_s', '50']) == 0
    text = capsys.readouterr().out
    assert 'strong preset: 2 rows, 1 trainings' in text and 'convnextv2_base' in text, text
    from cxrlt.plan import table_plan
    plan = table_plan('strong', data=d, img_per_s=50)
    assert plan.gpu_hours[22] > 0 and plan.epochs[21] == 20


def test_faithful_plan_finds_the_throughput_of_backbones_with_weight_tags(tmp_path):
    "The faithful recipe trains 'resnet50.tv_in1k' and others; the benchmark names the bare backbone: it is found."
    from conftest import tiny_challenge
    from cxrlt.models import paper_backbones
    from cxrlt.plan import table_plan
    d = tiny_challenge(tmp_path/'release', n_train=96, n_test=24)
    (d/'train.csv').rename(d/'CXRLT_2026_training.csv')
    (d/'test.csv').rename(d/'CXRLT_2026_TEST_ALL_TASK1.csv')
    rates = {b.name: 10.0 * (i + 1) for i, b in enumerate(paper_backbones())}
    report = {'results': [{'model': n, 'size': 512, 'status': 'ok', 'img_s': r} for n, r in rates.items()]}
    (tmp_path/'throughput.json').write_text(json.dumps(report))
    plan = table_plan('faithful', data=d, throughput=tmp_path/'throughput.json')
    trained = plan[plan.trains]
    assert trained.backbone.str.contains('.', regex=False).any()   # weight tags are there
    assert [rates[b.partition('.')[0]] for b in trained.backbone] == list(trained.img_per_s)
    assert trained.gpu_hours.notna().all() and (trained.gpu_hours > 0).all()
    assert main(['table', '--preset', 'faithful', '--data', str(d), '--dry-run',
                 '--throughput', str(tmp_path/'throughput.json')]) == 0


def test_new_augmentation_keys_keep_names_and_resumes_of_earlier_runs(tmp_path):
    "Runs named and stored before CLAHE, noise and dropout existed keep their names and resume (the keys at 0)."
    from cxrlt.core import save_json
    from cxrlt.train import LATER_AUGMENT_KEYS, TrainConfig, stored_run_problems
    # the names the version before these keys gave (computed with it)
    assert TrainConfig(lr=3e-3).resolved_run_name() == 'resnet10t-bce-249baed4'
    assert TrainConfig(lr=3e-3, augment={'hflip': 0}).resolved_run_name() == 'resnet10t-bce-32e453af'
    assert TrainConfig(lr=3e-3, augment={'clahe': 0.5}).resolved_run_name() != 'resnet10t-bce-249baed4'
    cfg = TrainConfig(lr=3e-3, augment={'hflip': 0}, out_dir=tmp_path)
    old = cfg.to_dict()
    old['augment'] = {k: v for k, v in old['augment'].items() if k not in LATER_AUGMENT_KEYS}
    run = tmp_path/cfg.resolved_run_name()
    run.mkdir()
    save_json({'status': 'running', 'params': old}, run/'manifest.json')
    assert stored_run_problems(run, cfg) == []
    assert stored_run_problems(run, TrainConfig(lr=3e-3, augment={'hflip': 0, 'noise': 0.1}, out_dir=tmp_path))
