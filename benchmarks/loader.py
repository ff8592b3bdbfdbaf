"""Images/s of the training loader (uint8 batches for `DeviceAugment`) vs. a bare read of the memory-mapped rows.

Writes synthetic 16-bit greyscale PNGs at the cache size, builds the uint8 cache with `cxrlt.cache.build_cache`,
and times full shuffled epochs of the same rows, batch size and labels:

- raw: a bare read of the memory map in this process, `images[rows]` (and the label rows) per batch;
- loader: `train_loader` over a `CachedImageDataset(normalize=False)` in its default configuration (threads = the
  CPUs this process may use, reading ahead; pinned batches when CUDA is present): uint8 (B, 1, S, S) batches,
  no float work per image on the CPU side. The ratio loader / raw is the acceptance figure (target >= 0.5);
- for comparison, a DataLoader with worker processes over the same uint8 rows (`cache_dataloader`);
- separately, `DeviceAugment` (flip, affine, brightness/contrast, normalisation) on those batches: on the GPU when
  there is one, else on this CPU with one thread, where it is far slower than on a GPU; not part of the ratio.

The last line printed is JSON with `size`, `loader_img_s`, `raw_img_s`, `ratio` and the other rates.

    .venv/bin/python benchmarks/loader.py [--size 512] [--images 512] [--batch-size 32] [--epochs 3]
"""
import argparse, json, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrlt.cache import _available_cpus, build_cache
from cxrlt.datasets import AugmentConfig, CachedImageDataset, DeviceAugment, cache_dataloader, train_loader


def write_pngs(folder, n, size):
    "`n` 16-bit PNGs of `size` x `size` with smooth structure and noise, written quickly (the content is not timed)."
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 30000 + 12000 * np.sin(xx / (size / 3.1)) * np.cos(yy / (size / 2.3))
    noise = rng.normal(0, 700, (size, size)).astype(np.float32)
    ids = [f'{i:05d}_bench.png' for i in range(n)]
    for i, name in enumerate(ids):
        Image.fromarray(np.clip(base + np.roll(noise, 37 * i) + 50 * i, 0, 65535).astype(np.uint16)).save(folder / name)
    return ids


def images_per_second(epoch, epochs):
    "Images/s over `epochs` calls of `epoch()` (each returning the images it delivered), after one untimed call."
    epoch()
    t0 = time.perf_counter()
    n = sum(epoch() for _ in range(epochs))
    return n / (time.perf_counter() - t0)


def raw_epoch(dataset, batch_size, seed):
    "One shuffled epoch of bare memory-map reads, `images[rows]` and the label rows per full batch."
    images = np.load(dataset.images_path, mmap_mode='r')
    order = np.random.default_rng(seed).permutation(len(dataset))
    def epoch():
        n = 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            x, _ = torch.from_numpy(images[dataset.rows[idx]]), torch.from_numpy(dataset.labels[idx])
            n += len(x)
        return n
    return epoch


def loader_epoch(loader):
    "One epoch of `loader`, counting the images of its batches."
    return lambda: sum(len(x) for x, _ in loader)


def augment_img_s(images, device, batches):
    "Images/s of `DeviceAugment()` on a uint8 batch on `device`, `batches` times (on a CPU with one thread)."
    augment, images = DeviceAugment(AugmentConfig()), images.to(device)
    if device.type == 'cpu': torch.set_num_threads(1)     # threads on a few shared cores mostly wait on each other
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    augment(images); sync()
    t0 = time.perf_counter()
    for _ in range(batches): augment(images)
    sync()
    return batches * len(images) / (time.perf_counter() - t0)


def print_table(a, r, device):
    print(f'\n| {a.size} px, batch {a.batch_size}, {a.images} images | images/s | vs raw |\n|---|---:|---:|')
    print(f"| bare memory-map read, one process (raw) | {r['raw_img_s']:.0f} | 1.00 |")
    print(f"| train_loader, uint8 batches, {r['workers']} threads | {r['loader_img_s']:.0f} | {r['ratio']:.2f} |")
    print(f"| DataLoader, {r['workers']} worker processes, uint8 rows | {r['dataloader_processes_img_s']:.0f} | "
          f"{r['dataloader_processes_img_s'] / r['raw_img_s']:.2f} |")
    print(f"| DeviceAugment on {device} (separate cost, not in the ratio) | {r['device_augment_img_s']:.0f} | |")
    if device.type == 'cpu':
        print('(no GPU here: DeviceAugment ran on this CPU with one thread, far slower than it runs on a GPU)')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=512, help='side of the cached images')
    p.add_argument('--images', type=int, default=512, help='number of cached images (one epoch)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=3, help='timed epochs (after one untimed warm-up epoch)')
    p.add_argument('--augment-batches', type=int, default=3, help='batches timed through DeviceAugment')
    a = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / 'images', Path(tmp) / 'cache'
        src.mkdir()
        t0 = time.perf_counter()
        ids = write_pngs(src, a.images, a.size)
        build_cache(ids, src, out, size=a.size, workers=1, chunk_size=256, progress=False)
        print(f'{a.images} synthetic {a.size} px PNGs written and cached in {time.perf_counter() - t0:.1f} s; '
              f'batch {a.batch_size}, {_available_cpus()} CPUs available, device {device}')
        labels = (np.random.default_rng(1).random((a.images, 30)) < 0.1).astype(np.float32)
        ds = CachedImageDataset(out, ids, labels, normalize=False)
        loader = train_loader(ds, a.batch_size)
        r = {'size': a.size, 'raw_img_s': images_per_second(raw_epoch(ds, a.batch_size, 0), a.epochs),
             'loader_img_s': images_per_second(loader_epoch(loader), a.epochs)}
        procs = cache_dataloader(ds, a.batch_size, train=True, num_workers=loader.num_workers)
        r['dataloader_processes_img_s'] = images_per_second(loader_epoch(procs), a.epochs)
        del procs
        r['device_augment_img_s'] = augment_img_s(next(iter(loader))[0], device, a.augment_batches)
    r = {**r, 'ratio': r['loader_img_s'] / r['raw_img_s'], 'device': device.type, 'batch_size': a.batch_size,
         'images': a.images, 'workers': loader.num_workers}
    print_table(a, r, device)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == '__main__':
    main()
