"The strong recipe's device steps (CLAHE, Gaussian noise, coarse dropout) against OpenCV, statistics and torchvision."
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from cxrlt.datasets import (AugmentConfig, DeviceAugment, affine_batch, augment_params, clahe_batch, dropout_batch,
                            jitter_batch, noise_batch, train_augmentation)

cv2 = pytest.importorskip('cv2')
OFF = AugmentConfig(hflip=0, degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)
WIDE = AugmentConfig(hflip=0.3, degrees=20.0, translate=0.1, scale=(0.8, 1.2), brightness=0.4, contrast=0.3)
STRONG = AugmentConfig(clahe=0.5, clahe_clip=3.0, clahe_tiles=4, noise=0.05, dropout=0.5, dropout_holes=4,
                       dropout_size=0.15)


def camera(h, w):
    "scikit-image's camera picture (512 px) resized to h × w, uint8."
    skimage_data = pytest.importorskip('skimage.data')
    return cv2.resize(skimage_data.camera(), (w, h), interpolation=cv2.INTER_AREA)


def smooth_random(h, w, seed):
    "A uint8 image of smooth random structure over a narrow grey range (where CLAHE's clipping bites)."
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 6)).astype(np.float32)
    img = cv2.GaussianBlur(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), max(h, w) / 30)
    img = (img - img.min()) / (img.max() - img.min() + 1e-6)
    lo, span = rng.uniform(20, 120), rng.uniform(30, 120)
    return np.clip(lo + span * img + rng.normal(0, 2, (h, w)), 0, 255).astype(np.uint8)


def opencv_clahe(images, clip, tiles):
    return np.stack([cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(a) for a in images])


def ours_clahe(images, clip, tiles):
    out = clahe_batch(torch.from_numpy(images).float().div(255)[:, None], clip, tiles)
    return (out[:, 0] * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize('h,w', [(32, 32), (64, 64), (224, 224), (384, 384), (512, 512), (100, 100), (37, 61),
                                 (8, 12), (5, 5)])
def test_clahe_equals_opencv(h, w, one_thread):
    "A batch of the camera picture and smooth random images: equal to OpenCV's CLAHE at every pixel (within 1 level)."
    images = np.stack([camera(h, w)] + [smooth_random(h, w, seed) for seed in range(3)])
    worst, differing, pixels = 0, 0, 0
    for clip in (0.5, 1.0, 2.0, 4.0, 40.0):
        for tiles in (1, 2, 4, 8, 16):
            d = np.abs(ours_clahe(images, clip, tiles).astype(int) - opencv_clahe(images, clip, tiles).astype(int))
            worst, differing, pixels = max(worst, d.max()), differing + (d > 0).sum(), pixels + d.size
    print(f'{h}x{w}: max difference {worst} grey levels, {differing / pixels:.2%} of pixels differ')
    assert worst <= 1 and differing <= 1e-3 * pixels          # OpenCV 4.14: equal at every pixel


def test_clahe_at_1024_px(one_thread):
    images = np.stack([camera(1024, 1024), smooth_random(1024, 1024, 7)])
    assert np.abs(ours_clahe(images, 2.0, 8).astype(int) - opencv_clahe(images, 2.0, 8).astype(int)).max() <= 1


def test_clahe_probability_zero_and_one():
    "Off, or on with no image chosen: the batch as it was; with probability 1 every image changes, to its CLAHE."
    x = torch.from_numpy(np.stack([smooth_random(32, 32, s) for s in range(6)])).float().div(255)[:, None]
    off = augment_params(OFF, 6, 32, 32, torch.Generator().manual_seed(0))
    assert torch.equal(DeviceAugment(OFF).augment(x, off), x)
    on = AugmentConfig(**{**vars(OFF), 'clahe': 1.0})
    p = augment_params(on, 6, 32, 32, torch.Generator().manual_seed(0))
    out = DeviceAugment(on).augment(x, p)
    assert bool(p['clahe'].all()) and torch.equal(out, clahe_batch(x))
    assert (out - x).abs().amax((1, 2, 3)).min() > 0.05
    assert torch.equal(DeviceAugment(on).augment(x, {**p, 'clahe': torch.zeros(6, dtype=torch.bool)}), x)
    some = AugmentConfig(**{**vars(OFF), 'clahe': 0.5})
    p = augment_params(some, 400, 8, 8, torch.Generator().manual_seed(1))
    assert stats.binomtest(int(p['clahe'].sum()), 400, 0.5).pvalue > 1e-3


def test_noise_statistics(one_thread):
    "On mid-grey: per image the added noise has the drawn std (within 3 %) and mean 0; noise=0 is the identity."
    n, side, noise = 48, 128, 0.1
    cfg = AugmentConfig(**{**vars(OFF), 'noise': noise})
    x = torch.full((n, 1, side, side), 0.5)
    p = augment_params(cfg, n, side, side, torch.Generator().manual_seed(0))
    d = (DeviceAugment(cfg).augment(x, p) - x).flatten(1).double()
    sigma = p['noise_std'].double()
    assert 0 <= sigma.min() and sigma.max() <= noise and sigma.std() > 0.02
    keep = sigma > 1e-3                                       # float32 steps near 0.5 are 6e-8: relative error
    assert ((d.std(1) / sigma - 1).abs()[keep] < 0.03).all()
    assert ((d.mean(1).abs() / (sigma / side))[keep] < 5).all()     # mean within 5 standard errors of 0
    draws = augment_params(cfg, 3000, 4, 4, torch.Generator().manual_seed(1))['noise_std']
    assert stats.kstest(draws.numpy(), stats.uniform(0, noise).cdf).pvalue > 1e-3
    assert torch.equal(DeviceAugment(OFF).augment(x, augment_params(OFF, n, side, side)), x)
    assert torch.equal(noise_batch(x, torch.zeros(n), torch.randn(n, 1, side, side)), x)


def test_noise_by_hand_in_float64():
    x = torch.tensor([[0.0, 0.25], [0.5, 0.97]], dtype=torch.float64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    z = torch.tensor([-1.0, 0.5, 3.0, 1.0], dtype=torch.float64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    sigma = torch.tensor([0.02, 0.2], dtype=torch.float64)
    ref = torch.tensor([[0.0, 0.26, 0.56, 0.99], [0.0, 0.35, 1.0, 1.0]], dtype=torch.float64).view(2, 1, 2, 2)
    assert torch.allclose(noise_batch(x, sigma, z), ref, rtol=0, atol=1e-12)


def erase_each(x, boxes):
    "Reference: `v2.functional.erase(img, top, left, height, width, v=0)` for each hole in turn, image by image."
    out = []
    for img, holes in zip(x, boxes):
        for top, left, h, w in holes.tolist():
            img = v2.functional.erase(img, top, left, h, w, torch.tensor(0.0))
        out.append(img)
    return torch.stack(out)


def test_dropout_equals_torchvision_erase():
    "Given holes (overlapping, past the edge, empty) and drawn ones: the same pixels erased, exactly."
    x = torch.rand(3, 1, 20, 24)
    boxes = torch.tensor([[[0, 0, 5, 5], [3, 3, 5, 5], [0, 0, 0, 0]], [[17, 20, 6, 6], [0, 10, 20, 2], [9, 9, 1, 1]],
                          [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    assert torch.equal(dropout_batch(x, boxes), erase_each(x, boxes))
    cfg = AugmentConfig(**{**vars(OFF), 'dropout': 0.7, 'dropout_holes': 5, 'dropout_size': 0.2})
    x = torch.rand(64, 1, 40, 30)
    p = augment_params(cfg, 64, 40, 30, torch.Generator().manual_seed(0))
    assert torch.equal(DeviceAugment(cfg).augment(x, p), erase_each(x, p['dropout_boxes']))


def test_dropout_draws():
    "Holes of side round(size · shorter side), inside the image, 1..holes of them in an image that gets any."
    cfg = AugmentConfig(**{**vars(OFF), 'dropout': 0.6, 'dropout_holes': 4, 'dropout_size': 0.1})
    boxes = augment_params(cfg, 4000, 64, 48, torch.Generator().manual_seed(0))['dropout_boxes']
    sides, count = boxes[..., 2], (boxes[..., 2] > 0).sum(1)
    assert set(sides.unique().tolist()) == {0, 5} and torch.equal(boxes[..., 2], boxes[..., 3])
    assert stats.binomtest(int((count > 0).sum()), 4000, 0.6).pvalue > 1e-3
    assert stats.chisquare(np.bincount(count[count > 0].numpy(), minlength=5)[1:]).pvalue > 1e-3
    top, left = boxes[..., 0].flatten(), boxes[..., 1].flatten()
    assert (top.min(), top.max(), left.min(), left.max()) == (0, 64 - 5, 0, 48 - 5)
    assert stats.chisquare(np.bincount(left.numpy(), minlength=44)).pvalue > 1e-3


def old_augment_params(cfg, n, height, width, generator=None, device=None):
    "`augment_params` as it was before the strong steps (commit 5ad32de), the reference for unchanged draws."
    dev = generator.device if generator is not None else torch.device(device or 'cpu')
    def u(lo, hi): return torch.rand(n, generator=generator, device=dev).mul_(hi - lo).add_(lo)
    t, b, c = cfg.translate, cfg.brightness, cfg.contrast
    return {'flip': u(0, 1) < cfg.hflip, 'angle': u(-cfg.degrees, cfg.degrees),
            'translate': torch.stack([u(-t * width, t * width), u(-t * height, t * height)], 1).round_(),
            'scale': u(*cfg.scale), 'brightness': u(max(0.0, 1 - b), 1 + b), 'contrast': u(max(0.0, 1 - c), 1 + c),
            'brightness_first': u(0, 1) < 0.5}


@pytest.mark.parametrize('cfg', [AugmentConfig(), WIDE, OFF])
def test_configs_without_the_new_steps_draw_as_before(cfg):
    "The same parameters, the same keys, and the generator left in the same state (so the next batch's draws too)."
    g_new, g_old = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(3):
        new, old = augment_params(cfg, 16, 32, 40, g_new), old_augment_params(cfg, 16, 32, 40, g_old)
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    assert torch.equal(g_new.get_state(), g_old.get_state())
    keys = ['hflip', 'degrees', 'translate', 'scale', 'brightness', 'contrast']
    assert list(AugmentConfig().to_dict())[:6] == keys
    assert {k: AugmentConfig().to_dict()[k] for k in keys} == dict(hflip=0.5, degrees=10.0, translate=0.05,
                                                                   scale=[0.9, 1.1], brightness=0.1, contrast=0.1)


def test_new_steps_draw_after_the_others():
    cfg = AugmentConfig(**{**vars(WIDE), 'clahe': 0.5, 'noise': 0.1, 'dropout': 0.5})
    new, old = augment_params(cfg, 8, 16, 16, torch.Generator().manual_seed(2)), \
        old_augment_params(WIDE, 8, 16, 16, torch.Generator().manual_seed(2))
    assert all(torch.equal(new[k], old[k]) for k in old)
    assert set(new) - set(old) == {'clahe', 'noise_std', 'noise', 'dropout_boxes'}


def test_order_flip_affine_jitter_clahe_noise_dropout(one_thread):
    "DeviceAugment.augment with every step on is the steps composed by hand in the documented order."
    cfg = AugmentConfig(**{**vars(WIDE), **{k: getattr(STRONG, k) for k in ('clahe', 'clahe_clip', 'clahe_tiles',
                           'noise', 'dropout', 'dropout_holes', 'dropout_size')}})
    x = torch.from_numpy(np.stack([smooth_random(32, 32, s) for s in range(8)])).float().div(255)[:, None]
    p = augment_params(cfg, 8, 32, 32, torch.Generator().manual_seed(0))
    p['clahe'][:4], p['clahe'][4:] = True, False
    ref = affine_batch(x, p['angle'], p['translate'], p['scale'], p['flip'])
    ref = jitter_batch(ref, p['brightness'], p['contrast'], p['brightness_first'])
    ref = torch.where(p['clahe'].view(-1, 1, 1, 1), clahe_batch(ref, 3.0, 4), ref)
    ref = dropout_batch(noise_batch(ref, p['noise_std'], p['noise']), p['dropout_boxes'])
    assert torch.equal(DeviceAugment(cfg).augment(x, p), ref)


def test_sharded_draws_and_cpu_pipeline():
    "Ranks applying their share of one draw get what one process gets; the CPU pipeline has the same steps."
    images = torch.from_numpy(np.stack([smooth_random(32, 32, s) for s in range(8)]))[:, None]
    a = DeviceAugment(STRONG)
    whole = a(images, torch.Generator().manual_seed(5))
    for r in (0, 1):
        assert torch.equal(a(images[r::2], torch.Generator().manual_seed(5), shard=(r, 2)), whole[r::2])
    steps = train_augmentation(AugmentConfig(**{**vars(WIDE), 'noise': 0.05})).transforms
    assert [type(s).__name__ for s in steps] == ['RandomHorizontalFlip', 'RandomAffine', 'ColorJitter',
                                                 'ClaheNoiseDropout']
    x = images[0].float().div(255)
    torch.manual_seed(0); first = train_augmentation(STRONG)(x)
    torch.manual_seed(0); again = train_augmentation(STRONG)(x)
    assert torch.equal(first, again) and first.shape == x.shape and 0 <= first.min() and first.max() <= 1
    assert train_augmentation(STRONG)(images[0]).dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_on_the_gpu_without_synchronising():
    "On CUDA: the same result as on the CPU for the same parameters, and no host-device synchronisation."
    images = torch.from_numpy(np.stack([smooth_random(64, 64, s) for s in range(16)]))[:, None]
    strong_only = AugmentConfig(**{**vars(OFF), 'clahe': 0.5, 'noise': 0.05, 'dropout': 0.5})
    x = images.float().div(255)
    p = augment_params(strong_only, 16, 64, 64, torch.Generator().manual_seed(0))
    cpu = DeviceAugment(strong_only).augment(x, p)
    gpu = DeviceAugment(strong_only).augment(x.cuda(), {k: v.cuda() for k, v in p.items()})
    assert (gpu.cpu() - cpu).abs().max() < 1e-6
    a = DeviceAugment(AugmentConfig(**{**vars(WIDE), 'clahe': 0.5, 'noise': 0.05, 'dropout': 0.5}))
    g, batch = torch.Generator('cuda').manual_seed(0), images.cuda()
    a(batch, g)                                          # copies the normalisation constants once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try: a(batch, g)
    finally: torch.cuda.set_sync_debug_mode('default')
