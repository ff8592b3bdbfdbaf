"""Images/s delivered by the cache DataLoader vs. decoding the PNGs every epoch.

Writes synthetic 16-bit greyscale PNGs of PadChest size (about 2000 x 2000) to a temporary folder, builds
the uint8 cache at 224 and 512 px, and times DataLoaders with the same workers, batch size and tensor
pipeline (grey to 3 channels, ImageNet normalisation, no augmentation) that either decode, window and
resize every PNG (what an epoch costs without a cache) or read rows of the cache. Prints images/s and the
ratio, plus: uint8 batches from a `normalize=False` dataset (copied to the GPU and normalised there with
`normalize_batch` when one is present), the cache rate with train augmentation, and the one-off cost of
building the cache (including the start of its worker processes, a large share with so few images).

    .venv/bin/python benchmarks/cache_vs_decode.py [--images 16] [--workers 2] [--batch-size 32]
"""
import argparse, os, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrlt.cache import build_cache
from cxrlt.datasets import (CachedImageDataset, cache_dataloader, normalize_batch, train_augmentation, IMAGENET_MEAN,
                            IMAGENET_STD)
from cxrlt.images import preprocess_image


def padchest_like_png(path, seed):
    "A ~2000 x 2000 16-bit PNG with smooth anatomy-like structure and quantum noise."
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1900, 2100)), int(rng.integers(1900, 2100))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    body = 28000 + 14000 * np.sin(xx / (w / 3.1) + seed) * np.cos(yy / (h / 2.3))
    body -= 9000 * np.exp(-((xx - w / 2) / (w / 9)) ** 2)
    Image.fromarray(np.clip(body + rng.normal(0, 700, (h, w)), 0, 65535).astype(np.uint16)).save(path)


class DecodingDataset(torch.utils.data.Dataset):
    "The same tensors as `CachedImageDataset`, but decoded from the PNG every time."
    def __init__(self, paths, size):
        self.paths, self.size = paths, size
        mean, std = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), torch.tensor(IMAGENET_STD).view(-1, 1, 1)
        self.scale, self.shift = 1 / std, -mean / std
    def __len__(self): return len(self.paths)
    def __getitem__(self, i):
        x = torch.from_numpy(preprocess_image(self.paths[i], self.size)).unsqueeze(0).float().div_(255)
        return torch.addcmul(self.shift, x, self.scale)


def images_per_second(loader, epochs, on_batch=lambda b: b):
    "Images/s over `epochs` passes, after one untimed pass that starts the workers and warms the page cache."
    for b in loader: on_batch(b)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader: n += len(on_batch(batch))
    if torch.cuda.is_available(): torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def to_gpu_normalised(batch):
    "What a GPU training loop does with a uint8 batch: copy it to the device, then `normalize_batch` there."
    return normalize_batch(batch.cuda(non_blocking=True))


def measure(size, src, ids, out, a):
    "Images/s at one size: cache build (once), decoding every epoch, the cache, its uint8 rows, with augmentation."
    def loader(ds, epochs, train=False, pin=False, on_batch=lambda b: b):
        dl = cache_dataloader(ds, a.batch_size, train=train, num_workers=a.workers, pin_memory=pin)
        return images_per_second(dl, epochs, on_batch)
    s = build_cache(ids, src, out, size=size, workers=a.workers, chunk_size=2, progress=False)
    build_rate = a.images / s['seconds']
    decode = loader(DecodingDataset([src / n for n in ids], size), epochs=1)
    cache = loader(CachedImageDataset(out, ids * a.repeat), epochs=2)
    gpu = torch.cuda.is_available()      # without a GPU: the rate of uint8 batches a GPU would receive
    cache8 = loader(CachedImageDataset(out, ids * a.repeat, normalize=False), epochs=2, pin=gpu,
                    on_batch=to_gpu_normalised if gpu else (lambda b: b))
    aug = loader(CachedImageDataset(out, ids * a.repeat, transform=train_augmentation()), epochs=1, train=True)
    print(f'{size:>4} px: build {build_rate:6.1f} img/s (once) | decode every epoch {decode:6.1f} img/s | '
          f'cache {cache:7.1f} img/s ({cache / decode:5.1f}x) | cache uint8 + normalize_batch {cache8:7.1f} img/s '
          f'({cache8 / decode:5.1f}x{"" if gpu else ", uint8 delivered, no GPU to normalise on"}) | '
          f'cache + train augmentation {aug:6.1f} img/s')
    return size, build_rate, decode, cache, cache8, aug


def print_table(rows):
    print('\n| size | decode PNGs every epoch | cache | ratio | cache, uint8 batches (+ `normalize_batch` on GPU) '
          '| ratio | cache + train augmentation | cache build (once, incl. process start) |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|')
    for size, build_rate, decode, cache, cache8, aug in rows:
        print(f'| {size} | {decode:.1f} | {cache:.0f} | {cache / decode:.0f}x | {cache8:.0f} | {cache8 / decode:.0f}x '
              f'| {aug:.0f} | {build_rate:.1f} |')
    print('(images/s; uint8 column: ' + ('batches copied to the GPU and normalised there)' if torch.cuda.is_available()
          else 'uint8 batches delivered, as a GPU would receive them; no GPU here)'))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=16, help='number of PadChest-size PNGs to generate')
    p.add_argument('--workers', type=int, default=os.cpu_count(),
                   help='DataLoader workers and cache-building processes')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    p.add_argument('--repeat', type=int, default=20, help='the cache is read as a dataset of images x repeat samples')
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / 'images'; src.mkdir()
        t0 = time.perf_counter()
        ids = [f'{i:04d}_bench.png' for i in range(a.images)]
        for i, name in enumerate(ids): padchest_like_png(src / name, i)
        mb = sum((src / n).stat().st_size for n in ids) / a.images / 1e6
        print(f'{a.images} synthetic 16-bit PNGs of ~2000x2000 ({mb:.1f} MB each) written in '
              f'{time.perf_counter() - t0:.1f} s; {a.workers} workers, batch {a.batch_size}, {os.cpu_count()} CPUs')
        print_table([measure(size, src, ids, Path(tmp) / f'cache{size}', a) for size in a.sizes])


if __name__ == '__main__':
    main()
