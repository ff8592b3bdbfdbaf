"""Test-time augmentation: all views in one batched forward pass vs one forward pass per view.

Times `cxrlt.posttrain.tta_log_odds` with `batched=True` (the K views of a batch of B images go through the
model as one K*B batch) and `batched=False` (K passes of B images), on random images through a randomly
initialised cxrlt model, after one untimed warm-up pass of each. Prints images/s, the ratio, plain inference
(no TTA) for reference, and the largest difference between the two merged outputs (they should agree to
float rounding).

    .venv/bin/python benchmarks/tta_batched.py [--model resnet10t] [--size 64] [--batch-size 16] [--images 64]
        [--views identity hflip scale=1.1 shift=0.05,0] [--device auto] [--amp off] [--threads 0]
"""
import argparse, contextlib, time

import numpy as np
import torch

from cxrlt.core import choose_device
from cxrlt.models import create_model
from cxrlt.posttrain import tta_log_odds
from cxrlt.devices import amp_dtype, autocast_for
from cxrlt.train import predict_logits


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def timed(fn, device, repeats):
    "Best-of-`repeats` wall time of `fn()`, after one untimed call."
    out = fn(); sync(device)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', default='resnet10t', help='a cxrlt.models.MODELS name')
    ap.add_argument('--size', type=int, default=64, help='image side in pixels')
    ap.add_argument('--batch-size', type=int, default=16, help='images per batch (each becomes K views)')
    ap.add_argument('--images', type=int, default=64, help='images per timed pass')
    ap.add_argument('--views', nargs='+', default=['identity', 'hflip', 'scale=1.1', 'shift=0.05,0'], help='TTA views')
    ap.add_argument('--device', default='auto')
    ap.add_argument('--amp', default='off', choices=['auto', 'bf16', 'fp16', 'off'])
    ap.add_argument('--repeats', type=int, default=3, help='timed passes; the best is reported')
    ap.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave as is)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    device = choose_device(a.device)
    torch.manual_seed(0)
    model = create_model(a.model, img_size=a.size).to(device).eval()
    images = torch.randn(a.images, 3, a.size, a.size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=a.batch_size)
    autocast = autocast_for(device, amp_dtype(device, a.amp)) if a.amp != 'off' else contextlib.nullcontext
    run = lambda batched: tta_log_odds(model, loader, a.views, batched=batched, device=device, autocast=autocast)
    plain = lambda: predict_logits(model, loader, device=device, autocast=autocast, progress=False)
    t_plain, _ = timed(plain, device, a.repeats)
    t_batched, out_b = timed(lambda: run(True), device, a.repeats)
    t_loop, out_l = timed(lambda: run(False), device, a.repeats)
    k = len(a.views)
    print(f'{a.model} at {a.size} px on {device} ({torch.get_num_threads()} CPU threads), amp {a.amp}: '
          f'{a.images} images, batches of {a.batch_size}, {k} views {a.views}')
    print(f'  plain inference (1 view)       {a.images / t_plain:9.1f} images/s')
    print(f'  TTA, one pass per view         {a.images / t_loop:9.1f} images/s  ({t_loop:.3f} s)')
    print(f'  TTA, views in one batched pass {a.images / t_batched:9.1f} images/s  ({t_batched:.3f} s)')
    print(f'  batched / per-view speed-up    {t_loop / t_batched:9.2f}x   '
          f'(TTA cost vs plain: {t_batched / t_plain:.2f}x for {k} views)')
    print(f'  max |difference| of merged log-odds: {np.abs(out_b - out_l).max():.2e}')


if __name__ == '__main__':
    main()
