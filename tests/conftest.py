"Shared test data: a tiny data set in the challenge's format that a small CNN learns in seconds."
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import pandas as pd
from PIL import Image

from cxrlt.labels import CLASSES

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


def tiny_challenge(folder, # where to write images/, train.csv (and test.csv, test_labels.csv) and cache/
                   n_train:int=96, # training images
                   n_test:int=0, # test images (test.csv in reverse order, and test_labels.csv)
                   size:int=48, # side of the 16-bit PNGs
                   cache_size:int=32, # side of the cached images
                   seed:int=0):
    """16-bit PNGs whose classes are bright squares at class-specific places on noise;
    class j is positive with a rate falling from 0.5 to 0.02."""
    from cxrlt.cache import build_cache
    rng = np.random.default_rng(seed)
    (folder/'images').mkdir(parents=True, exist_ok=True)
    cell = max(7, size // 7)  # a 6 × 5 grid of class squares, each (cell - 2) pixels wide

    def images(prefix, n):
        y = (rng.random((n, len(CLASSES))) < np.linspace(0.5, 0.02, len(CLASSES))).astype(int)
        for i in range(n):
            img = rng.normal(20000, 3000, (size, size))
            for j in np.flatnonzero(y[i]):
                r, c = divmod(j, 6)
                img[4 + cell * r: 2 + cell * (r + 1), 4 + cell * c: 2 + cell * (c + 1)] += 25000
            Image.fromarray(np.clip(img, 0, 65535).astype(np.uint16)).save(folder/'images'/f'{prefix}{i:04d}.png')
        ids = pd.DataFrame({'ImageID': [f'{prefix}{i:04d}.png' for i in range(n)], 'StudyDate_DICOM': 20200101,
                            'PatientID': [f'{i + 1}.00E+30' for i in range(n)]})
        return ids, pd.concat([ids, pd.DataFrame(y, columns=CLASSES)], axis=1)

    _, train = images('img', n_train)
    train.to_csv(folder/'train.csv', index=False)
    ids = train.ImageID.tolist()
    if n_test:
        test_ids, test = images('tst', n_test)
        test_ids.iloc[::-1].to_csv(folder/'test.csv', index=False)  # the test CSV in another order than the predictions
        test.to_csv(folder/'test_labels.csv', index=False)
        ids += test.ImageID.tolist()
    build_cache(ids, folder/'images', folder/'cache', size=cache_size, workers=1, progress=False)
    return folder


@pytest.fixture(scope='module')
def one_thread():
    "One torch thread for a module: tiny tensors on shared cores lose more to a second thread than they gain."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quiet_fit(cfg):
    "`cxrlt.train.fit(cfg)` with cxrlt's log at ERROR and warnings off (tiny data trip the PadChest-join notes)."
    import logging, warnings
    from pathlib import Path
    from cxrlt.core import logger
    from cxrlt.train import fit
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return Path(fit(cfg)['run_dir'])
    finally: logger.setLevel(level)


def launch_chromium(p):
    "Debian Chromium, headless, under Playwright (its own browser download cannot work here)."
    assert Path(CHROMIUM).exists(), ('Debian Chromium is missing: apt-get install -y --no-install-recommends chromium '
                                     '(.ci/run installs it); this test must run, not skip')
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def watch_page(page):
    "Collect console errors, uncaught exceptions, failed loads and JavaScript dialogs of `page`."
    problems = []
    page.on('console', lambda m: m.type == 'error' and problems.append(f'console: {m.text}'))
    page.on('pageerror', lambda e: problems.append(f'page error: {e}'))
    page.on('requestfailed', lambda r: problems.append(f'failed load: {r.url}'))
    page.on('dialog', lambda d: (problems.append(f'dialog: {d.message}'), d.dismiss()))
    return problems


def artifacts_dir(tmp_path_factory) -> Path:
    "Where browser tests leave screenshots: $CXRLT_ARTIFACTS, else a folder of the test run."
    d = Path(os.environ.get('CXRLT_ARTIFACTS') or tmp_path_factory.getbasetemp()/'artifacts')
    d.mkdir(parents=True, exist_ok=True)
    return d
