"""The Grad-CAM explorer as users build and use it: `cxrlt cam` on a table run and on one run, and the page in a real
browser (Debian Chromium driven by Playwright)."""
import json, re, warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cxrlt.cli
from cxrlt.cam import cam_cli, class_activation_maps, explorer_file, explorer_html
from conftest import artifacts_dir, launch_chromium, tiny_challenge, watch_page

PANEL_CLASSES = ['Normal', 'aortic elongation', 'cardiomegaly', 'calcified densities']   # the last: rare, negatives


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def table(tmp_path_factory):
    "A table run of two finished rows (ResNet, BCE and ASL, 2 epochs on 48 tiny 64-px images) and one unfinished row."
    from cxrlt.core import logger, save_json
    from cxrlt.datasets import AugmentConfig
    from cxrlt.train import TrainConfig, fit
    folder = tiny_challenge(tmp_path_factory.mktemp('tiny'), n_train=48, size=64, cache_size=64)
    level = logger.level
    logger.setLevel('ERROR')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            for loss in ('bce', 'asl'):
                fit(TrainConfig(train_csv=folder/'train.csv', train_cache=folder/'cache', out_dir=folder/'table',
                                backbone='resnet10t', loss=loss, run_name=f'resnet10t-{loss}', epochs=2, batch_size=12,
                                lr=3e-3, val_fraction=0.25, progress=False,
                                augment=AugmentConfig(degrees=0, translate=0, scale=(1, 1))))
    finally: logger.setLevel(level)
    (folder/'table'/'crashed').mkdir()
    save_json({'status': 'failed', 'params': {}}, folder/'table'/'crashed'/'manifest.json')
    return folder


@pytest.fixture(scope='module')
def explorer(table):
    "The explorer of the table run, built through `cxrlt cam` as a user types it."
    mp = pytest.MonkeyPatch()
    mp.setitem(cxrlt.cli.COMMANDS, 'cam', ('cxrlt.cam:cam_cli', 'Grad-CAM explorer'))
    try:
        rc = cxrlt.cli.main(['cam', '--run', str(table/'table'), '--n_images', '2',
                             '--classes', ','.join(PANEL_CLASSES), '--method', 'gradcam,gradcam++', '--device', 'cpu'])
    finally: mp.undo()
    assert rc == 0
    return table/'table'/'cam'


def test_cli_builds_the_table_run(table, explorer):
    cams = pd.read_csv(explorer/'cams.csv', dtype={'ImageID': str})
    assert sorted(cams.model.unique()) == ['resnet10t-asl', 'resnet10t-bce']          # the unfinished row is skipped
    assert len(cams) == 2 * 2 * len(PANEL_CLASSES) * 2                         # models × methods × classes × images
    labels = pd.read_csv(table/'train.csv').set_index('ImageID')
    for run, g in cams.groupby('model'):
        pred = pd.read_csv(table/'table'/run/'predictions.csv').query("split == 'val'").set_index('ImageID')
        np.testing.assert_allclose(g.probability, [pred.at[v, c] for v, c in zip(g.ImageID, g['class'])],
                                   rtol=0, atol=1e-12)
    assert cams.ground_truth.tolist() == [int(labels.at[v, c]) for v, c in zip(cams.ImageID, cams['class'])]
    split = pd.read_csv(table/'table'/'split.csv').set_index('ImageID')
    assert (split.loc[cams.ImageID.unique(), 'split'] == 'val').all()                 # validation images only
    for c, g in cams.groupby('class'):
        n_pos = int(labels.loc[split.index[split['split'] == 'val'], c].sum())
        slots = g.drop_duplicates('slot').sort_values('slot')
        assert slots.ground_truth.tolist() == [1] * min(2, n_pos) + [0] * (2 - min(2, n_pos))   # positives first
        assert g.groupby(['model', 'method']).ImageID.apply(tuple).nunique() == 1              # one panel for all
    for f in cams.overlay:
        with Image.open(explorer/f) as im: assert im.format == 'PNG' and im.width == 256 and im.height > 256
    page = (explorer/'index.html').read_text()
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page)                     # nothing from the network
    data = json.loads(re.search(r'id="cam-data">(.*?)</script>', page, re.S)[1])
    for t in data['tiles']: assert (explorer/t['src']).is_file()
    for im in data['images'].values(): assert (explorer/im['src']).is_file()
    assert [m['name'] for m in data['models']] == ['resnet10t-asl', 'resnet10t-bce']
    assert [m['feature_map'] for m in data['models']] == [[2, 2], [2, 2]]          # 64 px input / stride 32


def test_page_inlines_the_package_files(explorer):
    "index.html is one file: the package's explorer.css and explorer.js inline, in place of the links to them."
    import importlib.resources
    folder = importlib.resources.files('cxrlt').joinpath('explorer')
    html, css, js = ((folder/f'explorer.{x}').read_text(encoding='utf-8') for x in ('html', 'css', 'js'))
    page = (explorer/'index.html').read_text(encoding='utf-8')
    assert re.findall(r'<style>\n(.*?)</style>', page, re.S) == [css]
    assert re.findall(r'<script>\n(.*?)</script>', page, re.S) == [js]
    assert 'explorer.css' not in page and 'explorer.js' not in page and '<link rel="stylesheet"' not in page
    head, tail = html.split('<link rel="stylesheet" href="explorer.css">\n')
    assert page.startswith(head) and page.endswith(tail.split('<script src="explorer.js"></script>\n')[1])
    assert explorer_file('explorer.js') == js


def test_cli_single_run_and_errors(table, capsys):
    run = table/'table'/'resnet10t-bce'
    assert cam_cli(run=str(run), n_images=1, classes='cardiomegaly', device='cpu') == 0
    cams = pd.read_csv(run/'cam'/'cams.csv')
    assert cams.model.unique().tolist() == ['resnet10t-bce'] and len(cams) == 1
    assert (run/'cam'/'index.html').is_file()
    capsys.readouterr()
    def err(*args):   # `cxrlt cam ...` as users run it: exit code 2 and one line
        assert cxrlt.cli.main(['cam', *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('cxrlt cam: '), lines
        return lines[0]
    assert '--run is required' in err()
    assert 'not a CXR-LT 2026 class' in err('--run', str(run), '--classes', 'cardiomegally', '--device', 'cpu')
    assert "status 'failed'" in err('--run', str(table/'table'/'crashed'), '--device', 'cpu')
    assert 'is not a folder' in err('--run', str(table/'nowhere'), '--device', 'cpu')


def _reference_gradcam(model, x, k):
    "Grad-CAM by its published formula: ReLU(Σ_k mean(∂y/∂A_k)·A_k), min-max scaled, resized bilinearly, scaled again."
    from cxrlt.models import gradcam_target_layer
    store = {}
    hook = gradcam_target_layer(model).register_forward_hook(lambda m, i, o: store.__setitem__('A', o))
    logit = model(x)[:, k]
    hook.remove()
    g, = torch.autograd.grad(logit.sum(), store['A'])
    cam = torch.relu((g.mean((2, 3), keepdim=True) * store['A']).sum(1, keepdim=True)).detach()
    def minmax(c):
        lo, hi = c.amin((2, 3), keepdim=True), c.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (c - lo) / torch.where(hi > lo, hi - lo, 1), 0)
    return minmax(F.interpolate(minmax(cam), size=x.shape[-2:], mode='bilinear', align_corners=False))[:, 0].numpy()


@pytest.mark.parametrize('name', ['resnet10t', 'densenet121_half', 'tf_efficientnetv2_b0', 'efficientformerv2_s0',
                                  'convnext_atto'])
def test_every_family_matches_the_formula(name):
    from cxrlt.models import create_model, get_classifier
    torch.manual_seed(0)
    model = create_model(name, img_size=96).eval()
    with torch.no_grad(): get_classifier(model).weight.mul_(50)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad(): k = int(model(x).mean(0).argmax())      # the class with the most evidence: a non-empty map
    maps, _ = class_activation_maps(model, x, k)
    assert maps.shape == (2, 96, 96) and (maps.reshape(2, -1).max(1) > 0.99).all()
    np.testing.assert_allclose(maps, _reference_gradcam(model, x, k), atol=1e-3)


def test_explorer_in_chromium(explorer, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    cams = pd.read_csv(explorer/'cams.csv', dtype={'ImageID': str})
    shots = artifacts_dir(tmp_path_factory)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        problems = watch_page(page)
        page.goto((explorer/'index.html').resolve().as_uri())
        page.click('#models-none'); page.click('#classes-none')
        assert page.locator('#grid .tile').count() == 0
        assert 'Choose at least one model' in page.inner_text('#status')
        # 2 models × 2 classes, one image per class → 4 tiles
        page.get_by_label('resnet10t-asl', exact=False).check()
        page.get_by_label('resnet10t-bce', exact=False).check()
        page.get_by_label('aortic elongation', exact=True).check()
        page.get_by_label('cardiomegaly', exact=True).check()
        page.select_option('#per-class', '1')
        tiles = page.locator('#grid .tile')
        assert tiles.count() == 4
        page.wait_for_function("[...document.querySelectorAll('#grid .tile img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        # each tile shows its probability and ground truth, as in the manifest
        shown = cams[(cams.method == 'gradcam') & (cams.slot == 0)
                     & cams['class'].isin(['aortic elongation', 'cardiomegaly'])]
        shown = shown.sort_values(['class_index', 'model'])
        for i, (_, t) in enumerate(shown.iterrows()):
            text = tiles.nth(i).inner_text()
            assert f'p = {t.probability:.3f}' in text and ('GT positive' if t.ground_truth else 'GT negative') in text
        page.screenshot(path=str(shots/'cam_explorer_grid.png'), full_page=True)
        # click → enlarged view with the details
        tiles.nth(1).click()
        dialog = page.locator('#detail')
        assert dialog.is_visible()
        first = shown.iloc[1]
        assert page.inner_text('#detail-title') == f'{first["class"]} · {first.model} · {first.ImageID}'
        facts = page.inner_text('#detail-facts')
        assert f'{first.probability:.4f}' in facts and first.ImageID in facts
        page.wait_for_function("document.getElementById('detail-overlay').naturalWidth > 0"
                               " && document.getElementById('detail-image').naturalWidth > 0")
        page.screenshot(path=str(shots/'cam_explorer_detail.png'))
        page.keyboard.press('ArrowRight')                                    # next tile
        assert page.inner_text('#detail-title').startswith(f'{shown.iloc[2]["class"]} · {shown.iloc[2].model}')
        page.keyboard.press('Escape')
        assert not dialog.is_visible()
        page.wait_for_function("document.activeElement.dataset.index === '2'")   # focus back on the tile last shown
        # keyboard only: arrows move between tiles, Enter opens one
        page.keyboard.press('ArrowRight')                                    # tile 2 is row 1, column 0 of 2
        assert page.evaluate('document.activeElement.dataset.index') == '3'
        page.keyboard.press('ArrowUp')
        assert page.evaluate('document.activeElement.dataset.index') == '1'
        page.keyboard.press('Enter')
        assert dialog.is_visible() and page.inner_text('#detail-title').startswith(f'{first["class"]} · {first.model}')
        page.keyboard.press('Escape')
        # filters, at a threshold that makes the least likely negative a false positive
        page.get_by_label('calcified densities', exact=True).check()
        page.select_option('#per-class', '2')
        sel = cams[(cams.method == 'gradcam')
                   & cams['class'].isin(['aortic elongation', 'cardiomegaly', 'calcified densities'])]
        thr = np.floor(sel.probability[sel.ground_truth == 0].min() * 1e4) / 1e4
        page.fill('#threshold', f'{thr:.4f}')
        called = sel.probability >= thr
        for kind, want in (('fp', (sel.ground_truth == 0) & called), ('tp', (sel.ground_truth == 1) & called),
                           ('fn', (sel.ground_truth == 1) & ~called), ('all', called | ~called)):
            page.select_option('#filter', kind)
            assert tiles.count() == int(want.sum())
            if kind != 'all':
                assert all(kind in tiles.nth(i).get_attribute('class').split() for i in range(tiles.count()))
        assert int(((sel.ground_truth == 0) & called).sum()) >= 1
        browser.close()
    assert problems == [], problems
    assert (shots/'cam_explorer_grid.png').stat().st_size > 10_000
    print(f'screenshots in {shots}')


def test_explorer_shows_names_as_text(explorer, tmp_path_factory):
    "A class or run name holding markup is shown as text and runs nothing."
    from playwright.sync_api import sync_playwright
    data = json.loads((explorer/'cams.json').read_text())
    evil = '<img src=x onerror="document.title=\'pwned\'">cardio</script>&amp;'
    rename = {'cardiomegaly': evil}
    data['classes'] = [rename.get(c, c) for c in data['classes']]
    for key in ('panel', 'tiles'):
        for t in data[key]: t['class'] = rename.get(t['class'], t['class'])
    data['models'][0]['name'] = '<b>bold</b> run'
    page_file = explorer/'names.html'
    page_file.write_text(explorer_html(data))
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        problems = watch_page(page)
        page.goto(page_file.resolve().as_uri())
        page.click('#classes-none')
        page.get_by_label(evil, exact=True).check()
        assert page.locator('#grid .tile').count() > 0
        assert evil in page.inner_text('#grid tbody')
        assert page.locator('#grid img[src="x"], #controls img, #grid b').count() == 0
        assert '<b>bold</b> run' in page.inner_text('#model-choice')
        page.locator('#grid .tile').first.click()
        assert page.inner_text('#detail-title').startswith(evil)
        assert page.title() != 'pwned'
        browser.close()
    assert problems == [], problems
