"The GPU data path: `train_loader`'s uint8 batches and `DeviceAugment` against torchvision's per-image pipeline."
import json, subprocess, sys, threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from cxrlt.cache import _available_cpus, build_cache, open_cache
from cxrlt.datasets import (AugmentConfig, CachedImageDataset, DeviceAugment, affine_batch, augment_params,
                            normalize_batch, train_augmentation, train_loader)
from cxrlt.samplers import ClassAwareSampler

ROOT = Path(__file__).resolve().parents[1]
WIDE = AugmentConfig(hflip=0.3, degrees=20.0, translate=0.1, scale=(0.8, 1.2), brightness=0.4, contrast=0.3)
OFF = AugmentConfig(hflip=0, degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)


def smooth_images(n, h, w, seed=0):
    "Float (n, 1, h, w) images in [0, 1]: smooth structure plus noise, some bright enough for brightness to clip."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing='ij')
    base = torch.stack([0.55 + 0.35 * torch.sin(xx / (2 + i) + i) * torch.cos(yy / (3 + i)) for i in range(n)])
    return (base + 0.08 * torch.rand(n, h, w, generator=g)).clamp(0, 1)[:, None]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    "A 32 px cache of twelve 16-bit PNGs and its ImageIDs."
    d = tmp_path_factory.mktemp('datasets')
    (d / 'src').mkdir()
    ids = [f'im{i:02d}.png' for i in range(12)]
    for i, name in enumerate(ids):
        a = (smooth_images(1, 40, 36, seed=i)[0, 0].numpy() * 60000).astype(np.uint16)
        Image.fromarray(a).save(d / 'src' / name)
    build_cache(ids, d / 'src', d / 'cache', size=32, workers=1, progress=False)
    return open_cache(d / 'cache'), ids


def torchvision_draws(cfg, n, h, w, seed=1):
    "n parameter sets drawn by today's per-image pipeline (`train_augmentation(cfg)`), one call per image."
    flip, affine, jitter = train_augmentation(cfg).transforms
    torch.manual_seed(seed)
    probe = torch.arange(2.0).view(1, 1, 2)              # a flip is visible on it
    flips = torch.tensor([bool(flip(probe)[0, 0, 0] == 1) for _ in range(n)])
    aff = [affine.make_params([torch.zeros(1, h, w)]) for _ in range(n)]
    col = [jitter.make_params([]) for _ in range(n)]
    order = [int((p['fn_idx'] == 0).nonzero()) < int((p['fn_idx'] == 1).nonzero()) for p in col]
    return {'flip': flips, 'angle': torch.tensor([p['angle'] for p in aff]),
            'translate': torch.tensor([p['translate'] for p in aff], dtype=torch.float32),
            'scale': torch.tensor([p['scale'] for p in aff]),
            'brightness': torch.tensor([p['brightness_factor'] for p in col]),
            'contrast': torch.tensor([p['contrast_factor'] for p in col]), 'brightness_first': torch.tensor(order)}


def test_parameters_match_torchvision_distributions(one_thread):
    "Per-sample draws against torchvision's own `make_params` draws (KS, chi-square) and the uniform laws they state."
    n, h, w = 3000, 48, 40
    ours = augment_params(WIDE, n, h, w, torch.Generator().manual_seed(0))
    tv = torchvision_draws(WIDE, n, h, w)
    laws = {'angle': (-20, 40), 'scale': (0.8, 0.4), 'brightness': (0.6, 0.8), 'contrast': (0.7, 0.6)}
    for k, (lo, width) in laws.items():
        assert stats.ks_2samp(ours[k].numpy(), tv[k].numpy()).pvalue > 1e-3, k
        assert stats.kstest(ours[k].numpy(), stats.uniform(lo, width).cdf).pvalue > 1e-3, k
        assert lo <= ours[k].min() and ours[k].max() <= lo + width, k
    for j, side in ((0, w), (1, h)):          # whole pixels in [-round(0.1 side), round(0.1 side)]: x 4, y 5
        a, b = ours['translate'][:, j].long(), tv['translate'][:, j].long()
        assert set(a.tolist()) == set(b.tolist()) == set(range(-round(0.1 * side), round(0.1 * side) + 1))
        counts = np.array([np.bincount(v.numpy() + 10, minlength=21) for v in (a, b)])
        assert stats.chi2_contingency(counts[:, counts.sum(0) > 0]).pvalue > 1e-3
    for k, p in (('flip', 0.3), ('brightness_first', 0.5)):
        for draws in (ours, tv):
            assert stats.binomtest(int(draws[k].sum()), n, p).pvalue > 1e-3, k


def torchvision_per_image(cfg, x, p):
    "Image x (1, H, W) through today's pipeline steps with the parameters `p` of one sample."
    flip, affine, jitter = train_augmentation(cfg).transforms
    if p['flip']: x = flip.transform(x, {})
    x = affine.transform(x, dict(angle=float(p['angle']), translate=tuple(int(t) for t in p['translate']),
                                 scale=float(p['scale']), shear=(0.0, 0.0)))
    order = [0, 1, 2, 3] if p['brightness_first'] else [1, 0, 2, 3]
    return jitter.transform(x, dict(fn_idx=torch.tensor(order), brightness_factor=float(p['brightness']),
                                    contrast_factor=float(p['contrast']), saturation_factor=None, hue_factor=None))


@pytest.mark.parametrize('h,w', [(32, 32), (40, 48)])
def test_batched_transform_equals_torchvision_per_image(h, w, one_thread):
    "Fixed per-sample parameters: the batch equals flip + `affine` + ColorJitter of each image alone, within 2e-5."
    x = smooth_images(16, h, w)
    p = augment_params(WIDE, 16, h, w, torch.Generator().manual_seed(3))
    p['flip'][:2], p['flip'][2:4] = True, False            # both branches of each choice are in the batch
    p['brightness_first'][:3], p['brightness_first'][3:6] = True, False
    out = DeviceAugment(WIDE).augment(x, p)
    ref = torch.stack([torchvision_per_image(WIDE, x[i], {k: v[i] for k, v in p.items()}) for i in range(16)])
    assert (out - ref).abs().max() < 2e-5
    swapped = {**p, 'brightness_first': ~p['brightness_first']}
    alt = torch.stack([torchvision_per_image(WIDE, x[i], {k: v[i] for k, v in swapped.items()}) for i in range(16)])
    assert (alt - ref).abs().amax((1, 2, 3)).max() > 1e-2   # clipping bites: the order is tested, not immaterial


def test_warp_conventions_against_torch_ops():
    "Rotation about the centre (90° is rot90(-1)), shifts in whole pixels to the right/down, flips: exact references."
    x = smooth_images(2, 9, 9)
    one = lambda v: torch.tensor([float(v)] * 2)
    rot = affine_batch(x, one(90), torch.zeros(2, 2), one(1))
    assert torch.allclose(rot, torch.rot90(x, -1, (-2, -1)), atol=1e-5)
    shifted = affine_batch(x, one(0), torch.tensor([[1.0, 2.0]] * 2), one(1))
    assert torch.allclose(shifted[..., 2:, 1:], x[..., :-2, :-1], atol=1e-6)
    assert shifted[..., :2, :].abs().max() == 0 and shifted[..., :, :1].abs().max() == 0      # fill 0
    flipped = affine_batch(x, one(0), torch.zeros(2, 2), one(1), flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-6) and torch.allclose(flipped[1], x[1], atol=1e-6)
    zoom = affine_batch(x, one(0), torch.zeros(2, 2), one(2))     # the centre pixel of an odd image stays put
    assert torch.allclose(zoom[..., 4, 4], x[..., 4, 4], atol=1e-6)


def test_same_distribution_as_per_image_pipeline(one_thread):
    "Outputs for one image, 400 draws each: DeviceAugment vs `train_augmentation` (KS on mean grey and a pixel)."
    x = smooth_images(1, 24, 24, seed=5)
    torch.manual_seed(0)
    pipe = train_augmentation(WIDE)
    tv = torch.stack([pipe(x[0]) for _ in range(400)])
    ours = DeviceAugment(WIDE).augment(x.expand(400, 1, 24, 24).contiguous(),
                                                    augment_params(WIDE, 400, 24, 24, torch.Generator().manual_seed(1)))
    for f in (lambda t: t.mean((1, 2, 3)), lambda t: t[:, 0, 7, 15], lambda t: t[:, 0, :, :3].mean((1, 2))):
        assert stats.ks_2samp(f(ours).numpy(), f(tv).numpy()).pvalue > 1e-3


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no GPU'))])
@pytest.mark.parametrize('channels,mean,std', [(3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), (1, (0.4,), (0.3,))])
def test_output_and_normalisation(device, channels, mean, std):
    "Float32 (B, C, S, S) on the batch's device; with every augmentation off it is `normalize_batch`."
    images = (smooth_images(5, 32, 32) * 255).round().to(torch.uint8).to(device)
    out = DeviceAugment(WIDE, channels, mean, std)(images)
    assert (out.dtype, tuple(out.shape), out.device.type) == (torch.float32, (5, channels, 32, 32), device)
    plain = DeviceAugment(OFF, channels, mean, std)(images)
    assert torch.allclose(plain, normalize_batch(images, channels, mean, std), atol=1e-5)
    ref = (images.double().cpu() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    assert torch.allclose(plain.double().cpu(), ref, atol=1e-5)          # a float64 hand computation


def test_each_augmentation_alone_matches_its_torchvision_step(one_thread):
    "A configuration with one step on runs that step alone, as `train_augmentation` of it does."
    x = smooth_images(6, 32, 32)
    flip_only = AugmentConfig(**{**vars(OFF), 'hflip': 1.0})
    assert torch.equal(DeviceAugment(flip_only).augment(x, augment_params(flip_only, 6, 32, 32)), x.flip(-1))
    for key in ('brightness', 'contrast'):
        cfg = AugmentConfig(**{**vars(OFF), key: 0.3})
        (jitter,) = train_augmentation(cfg).transforms
        p = augment_params(cfg, 6, 32, 32, torch.Generator().manual_seed(0))
        factors = {f'{k}_factor': None for k in ('brightness', 'contrast', 'saturation', 'hue')}
        ref = torch.stack([jitter.transform(x[i], {**factors, 'fn_idx': torch.arange(4), f'{key}_factor':
                                                   float(p[key][i])}) for i in range(6)])
        assert p[key].std() > 0.05 and torch.allclose(DeviceAugment(cfg).augment(x, p), ref, atol=1e-6), key


def test_reproducible_with_a_seeded_generator():
    images = (smooth_images(8, 32, 32) * 255).to(torch.uint8)
    a = DeviceAugment()
    first = a(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, a(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, a(images, torch.Generator().manual_seed(8)))
    torch.manual_seed(3); g1 = a(images)
    torch.manual_seed(3); g2 = a(images)
    assert torch.equal(g1, g2)                                  # without a generator: the global one


def test_copies_in_a_batch_get_their_own_parameters():
    image = (smooth_images(1, 32, 32) * 255).to(torch.uint8)
    out = DeviceAugment()(image.expand(16, 1, 32, 32), torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == 16
    assert (torch.cdist(flat, flat) + torch.eye(16) * 1e9).min() > 1e-3
    p = augment_params(AugmentConfig(), 16, 32, 32, torch.Generator().manual_seed(0))
    assert len(set(p['angle'].tolist())) == 16 and len(set(p['brightness'].tolist())) == 16


def test_train_loader_serves_the_sharded_sampler_as_uint8_batches(cache):
    c, ids = cache
    labels = np.eye(12, 4, dtype=np.float32) + np.eye(12, 4, -4, dtype=np.float32) + np.eye(12, 4, -8, dtype=np.float32)
    ds = CachedImageDataset(c, ids, labels, normalize=False)
    served = []
    for rank in (0, 1):
        sampler = ClassAwareSampler(labels, num_samples=16, seed=2, num_replicas=2, rank=rank)
        loader = train_loader(ds, batch_size=4, sampler=sampler, num_workers=2)
        assert (loader.num_workers, loader.pin_memory, len(loader)) == (2, torch.cuda.is_available(), 2)
        sampler.set_epoch(5); drawn = list(sampler); sampler.set_epoch(5)
        batches = list(loader)
        assert all(x.dtype == torch.uint8 and tuple(x.shape) == (4, 1, 32, 32) for x, _ in batches)
        np.testing.assert_array_equal(torch.cat([x for x, _ in batches])[:, 0].numpy(), np.asarray(c.images)[drawn])
        np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), labels[drawn])
        served += drawn
    full = ClassAwareSampler(labels, num_samples=16, seed=2); full.set_epoch(5)
    assert sorted(served) == sorted(full)                      # the two ranks share one epoch's draws
    assert train_loader(ds).num_workers == _available_cpus()


def test_train_loader_shuffles_drops_and_leaves_no_threads(cache):
    c, ids = cache
    ds = CachedImageDataset(c, ids, normalize=False)
    before = threading.active_count()
    loader = train_loader(ds, batch_size=5, num_workers=2, seed=1)
    epochs = [torch.cat(list(loader)) for _ in range(2)]
    assert [len(e) for e in epochs] == [10, 10]                              # 12 images: the partial batch dropped
    assert not torch.equal(epochs[0], epochs[1])                            # a new order each epoch
    assert torch.equal(torch.cat(list(train_loader(ds, batch_size=5, num_workers=0, seed=1))), epochs[0])
    for _ in zip(range(1), loader): pass                                    # an epoch abandoned after one batch
    import gc; gc.collect()
    assert threading.active_count() == before


def test_no_float_work_per_image_on_the_cpu(cache):
    "Every torch op run while reading uint8 batches or items: none makes a float tensor the size of an image."
    c, ids = cache
    ds = CachedImageDataset(c, ids, np.zeros((12, 3), np.float32), normalize=False)
    class Ops(TorchDispatchMode):
        def __init__(self): super().__init__(); self.seen = []
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [(func, o) for o in (out if isinstance(out, (list, tuple)) else [out])
                          if isinstance(o, torch.Tensor)]
            return out
    with Ops() as ops:
        batches = list(train_loader(ds, batch_size=4, num_workers=0))      # read in this thread, where ops are seen
        items = [ds[i] for i in range(3)]
    assert len(batches) == 3 and items[0][0].dtype == torch.uint8 and ops.seen         # the mode sees the reads' ops
    image_sized_float = lambda seen: [str(f) for f, o in seen if o.is_floating_point() and o.numel() >= 32 * 32]
    assert image_sized_float(ops.seen) == []
    with Ops() as control:
        CachedImageDataset(c, ids)[0]                                    # normalize=True: float work per image
    assert image_sized_float(control.seen)


def test_benchmark_script_reports_json():
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'loader.py'), '--size', '64', '--images', '256',
                        '--epochs', '1', '--augment-batches', '1'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {'size', 'loader_img_s', 'raw_img_s', 'ratio'} <= set(out) and out['size'] == 64
    assert out['ratio'] == pytest.approx(out['loader_img_s'] / out['raw_img_s'], rel=1e-2)
    assert 'train_loader, uint8 batches' in r.stdout
