"""Step time of SAM against the plain step it wraps, in one run.

resnet10t at 64 px, batch 8, AdamW, through `cxrlt.train.train_one_epoch` on random batches; each setting is timed
`--repeats` times, interleaved, and the best is kept. SAM runs two forward/backward passes per step, so the ratio
should be close to 2; more than that is overhead of the wrapper.

    .venv/bin/python benchmarks/sam_step.py [--steps 6] [--repeats 3] [--rho 0.05]
"""
import argparse, time

import torch
from torch import nn

from cxrlt.models import create_model
from cxrlt.train import TrainConfig, _optimizer, train_one_epoch


def seconds_per_step(batches, sam_rho) -> float:
    "Mean seconds per optimizer step over `batches` after two warm-up steps."
    torch.manual_seed(0)
    model = create_model('resnet10t', num_classes=30, img_size=64)
    opt = _optimizer(TrainConfig(sam_rho=sam_rho), model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = lambda b: train_one_epoch(model, b, nn.BCEWithLogitsLoss(), opt, sched, device=torch.device('cpu'),
                                    progress=False)
    run(batches[:2])
    t0 = time.perf_counter()
    run(batches)
    return (time.perf_counter() - t0) / len(batches)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--rho', type=float, default=0.05)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 64, 64, generator=g), (torch.rand(8, 30, generator=g) < 0.3).float())
               for _ in range(a.steps)]
    times = {None: [], a.rho: []}
    for _ in range(a.repeats):
        for rho in times: times[rho].append(seconds_per_step(batches, rho))
    plain, sam = min(times[None]), min(times[a.rho])
    print(f'torch threads {torch.get_num_threads()}: plain {plain * 1e3:.0f} ms/step, SAM (rho {a.rho}) '
          f'{sam * 1e3:.0f} ms/step, ratio {sam / plain:.2f}')


if __name__ == '__main__':
    main()
