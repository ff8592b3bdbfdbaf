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
        assert p['augment'] == {'hflip': 0.0, 'degrees': 0.0, 'translate': 0.0, 'scale': [1.0, 1.0],
                                'brightness': 0.0, 'contrast': 0.0}
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
