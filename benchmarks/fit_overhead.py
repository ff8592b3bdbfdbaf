"""Training-step overhead of `cxrlt.train.fit` against a bare hand-written timm + PyTorch loop.

Both train the same model (resnet10t, BCE, AdamW, fp32 on the CPU) on the same cached images with the same
DataLoader settings and batch size; `fit` adds its sampler, schedule, progress bar and bookkeeping. Images/s
of the training passes are compared (fit's own epoch rate from `history.csv`, which excludes evaluation and
checkpointing); each is measured `--repeats` times alternately and the best rate is kept.

    .venv/bin/python benchmarks/fit_overhead.py [--images 512] [--size 64] [--batch-size 32] [--repeats 3]
"""
import argparse, tempfile, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image

from cxrlt.cache import build_cache
from cxrlt.datasets import AugmentConfig, CachedImageDataset
from cxrlt.labels import CLASSES
from cxrlt.train import TrainConfig, fit


def make_data(folder: Path, n: int, size: int):
    rng = np.random.default_rng(0)
    (folder/'images').mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(folder/'images'/f'img{i:05d}.png')
    y = (rng.random((n, len(CLASSES))) < 0.1).astype(int)
    ids = pd.DataFrame({'ImageID': [f'img{i:05d}.png' for i in range(n)], 'StudyDate_DICOM': 20200101,
                        'PatientID': [f'{i + 1}.00E+30' for i in range(n)]})
    pd.concat([ids, pd.DataFrame(y, columns=CLASSES)], axis=1).to_csv(folder/'train.csv', index=False)
    build_cache(ids.ImageID.tolist(), folder/'images', folder/'cache', size=size, workers=1, progress=False)


def bare_loop(folder: Path, batch_size: int, n_train: int) -> float:
    "Images/s of a hand-written loop over the same cached training images."
    from cxrlt.splits import load_split
    split = load_split(folder/'runs'/'split.csv')
    df = pd.read_csv(folder/'train.csv').set_index('ImageID')
    ids = [i for i in df.index if split[i] == 'train'][:n_train]
    ds = CachedImageDataset(folder/'cache', ids, df.loc[ids, CLASSES].to_numpy(np.float32))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    seen, t0 = 0, time.perf_counter()
    for x, y in dl:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def fit_rate(folder: Path, batch_size: int, k: int) -> float:
    no_augmentation = AugmentConfig(hflip=0, degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
    cfg = TrainConfig(train_csv=folder/'train.csv', train_cache=folder/'cache', out_dir=folder/'runs',
                      run_name=f'bench{k}', backbone='resnet10t', loss='bce', epochs=1, batch_size=batch_size, lr=1e-3,
                      progress=False, augment=no_augmentation)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = fit(cfg)
    return float(pd.read_csv(Path(r['run_dir'])/'history.csv').images_per_s.iloc[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=512)
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder, a.images, a.size)
        fits, bares = [], []
        for k in range(a.repeats):
            fits.append(fit_rate(folder, a.batch_size, k))
            n_train = int((pd.read_csv(folder/'runs'/'split.csv').split == 'train').sum())
            bares.append(bare_loop(folder, a.batch_size, n_train))
        f, b = max(fits), max(bares)
        print(f'resnet10t, {a.size} px, batch {a.batch_size}, {a.threads} thread(s), best of {a.repeats}:')
        print(f'  bare loop {b:.1f} img/s, fit {f:.1f} img/s, overhead ratio (bare / fit) {b / f:.3f}')


if __name__ == '__main__':
    main()
