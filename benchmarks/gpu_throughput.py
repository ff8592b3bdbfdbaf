"""Training throughput of the paper's backbones on one GPU: images/s from the uint8 cache, TFLOP/s, MFU, memory.

For each backbone (default: every paper backbone, `cxrlt.models.paper_backbones()`) and each size (default 512 px,
the paper's, then 384 and 224 for comparison) a randomly initialised cxrlt model trains for a few timed steps with
the data path included: uint8 batches read from a synthetic `cxrlt.cache` image cache by
`CachedImageDataset(normalize=False)` through `train_loader` (worker processes, pinned memory; `cache_dataloader`
where cxrlt.datasets has no `train_loader`), copied to the device and augmented + normalised there by
`DeviceAugment` (`normalize_batch` where there is none, or with `--device-transform normalize`), channels_last,
bf16 autocast, BCE over the 30 classes, fused AdamW, `torch.compile` through `cxrlt.devices.CompiledOrEager`
(eager, with a message, when compiling fails), as `fit` runs on CUDA. Warm-up steps (the first one compiles) are
not timed; the timed region starts and ends with `torch.cuda.synchronize()`.

Per backbone x size: images/s; training TFLOP/s = 3 x forward FLOPs x images/s, the forward FLOPs of one image
counted by `cxrlt.models.model_complexity` (torch's FlopCounterMode on the meta device, 2 FLOPs per multiply-add);
MFU against the bf16 matmul peak measured at the start of the same run; peak memory
(`torch.cuda.max_memory_allocated`); the largest batch that fits (doubling single eager training steps on
device-resident batches until an out-of-memory error, `--max-batch` or the budget stops it).

Budget: measurements are planned within `--budget-s` (420 s) of the start of `main`. Each model gets the time left
divided by the models left (time one does not use passes on to the next); a size starts only if the model's share
still holds as long as its previous size took (the first size: `--min-start-s`), else it is recorded as skipped.
The timed steps and the batch search stop at the end of the share. A hard limit (`--hard-limit-s`, 460 s) interrupts
whatever runs (a long compile), records it and writes the results, so that a run with imports stays under 8 min.

Writes throughput.json (every number, device, versions, settings) and throughput.md to `--out` after every
measurement, atomically. `--cpu-smoke` runs the same code on the CPU at a tiny scale (ResNet-50's CPU proxy at 64 and
32 px, float32, no compile, a few steps; peak memory n/a; MFU against a float32 CPU matmul peak) in seconds.

    .venv/bin/python benchmarks/gpu_throughput.py                      # one GPU, under 8 minutes
    .venv/bin/python benchmarks/gpu_throughput.py --models convnext_base --sizes 512 --budget-s 120
    .venv/bin/python benchmarks/gpu_throughput.py --cpu-smoke --out /tmp/gpu_throughput
"""
import argparse, dataclasses, datetime, gc, math, os, signal, sys, tempfile, time, traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cxrlt.datasets
from cxrlt.cache import build_cache
from cxrlt.core import atomic_write, git_state, host_info, package_versions, save_json
from cxrlt.datasets import CachedImageDataset, cache_dataloader, normalize_batch
from cxrlt.labels import CLASSES
from cxrlt.models import backbone, create_model, model_complexity, paper_backbones
from cxrlt.devices import CompiledOrEager, amp_dtype, autocast_for

FLOPS_SOURCE = ('cxrlt.models.model_complexity: torch.utils.flop_counter.FlopCounterMode over one image\'s forward '
                'pass on the meta device (2 FLOPs per multiply-add); training FLOPs taken as 3 x forward')
GPU_DEFAULTS = dict(models=None, sizes=[512, 384, 224], batch_size=64, warmup_steps=5, steps=30, max_timed_s=8.0,
                    cache_images=256, workers=min(8, len(os.sched_getaffinity(0))), amp='bf16', compile='on',
                    max_batch=2048, budget_s=420.0, hard_limit_s=460.0, min_start_s=10.0,
                    matmul_sizes=[4096, 8192, 16384], loader_batches=20)
SMOKE_DEFAULTS = dict(models=None, sizes=[64, 32], batch_size=8, warmup_steps=2, steps=3, max_timed_s=2.0,
                      cache_images=16, workers=0, amp='off', compile='off', max_batch=16, budget_s=40.0,
                      hard_limit_s=50.0, min_start_s=0.0, matmul_sizes=[256, 512], loader_batches=3)
RESULT_KEYS = ('model', 'timm_name', 'paper_name', 'size', 'status', 'note', 'batch_size', 'warmup_steps',
               'timed_steps', 'timed_s', 'img_s', 'step_ms', 'first_step_s', 'compile', 'fwd_gflops_per_image',
               'train_tflops', 'mfu', 'peak_memory_gib', 'max_batch', 'max_batch_limited_by', 'seconds')


class HardLimit(BaseException):
    "The hard wall-clock limit was reached (a BaseException, so that no `except Exception` swallows it)."


@dataclasses.dataclass
class Settings:
    "What one run measures and how (the command line with the GPU or `--cpu-smoke` defaults filled in)."
    cpu_smoke: bool
    models: list          # cxrlt backbone names
    sizes: list           # square input sizes, measured in this order for each model
    batch_size: int       # images per step at the first size; other sizes keep the pixels per step about equal
    warmup_steps: int     # untimed steps, the first of which compiles
    steps: int            # timed steps (at most; `max_timed_s` and the budget may stop them earlier, after 3)
    max_timed_s: float    # longest timed region of one measurement
    cache_images: int     # distinct images in the synthetic cache
    workers: int          # DataLoader worker processes
    amp: str              # 'bf16' (autocast) or 'off' (float32)
    compile: str          # 'on' or 'off'
    max_batch: int        # the largest-batch search stops here
    budget_s: float       # planned time of all measurements, from the start of `main`
    hard_limit_s: float   # whatever runs at this time is interrupted and the results are written
    min_start_s: float    # a model's first size starts only with this much of its share left
    matmul_sizes: list    # sides of the square matmuls that measure the peak
    loader_batches: int   # batches timed for the data path alone
    device_transform: str # 'auto' (DeviceAugment when cxrlt.datasets has it), 'augment' or 'normalize'
    out: str              # folder for throughput.json and throughput.md


def parse_args(argv=None) -> Settings:
    "The settings from the command line; options left out take the GPU or the `--cpu-smoke` defaults."
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--cpu-smoke', action='store_true', help='the same code on the CPU at a tiny scale, in seconds')
    p.add_argument('--models', nargs='+', help='cxrlt backbone names (default: the paper backbones; cpu-smoke: '
                   "ResNet-50's CPU proxy)")
    p.add_argument('--sizes', nargs='+', type=int, help='input sizes in px, measured in this order (default 512 384 '
                   '224; cpu-smoke 64 32)')
    p.add_argument('--batch-size', type=int, help='images per step at the first size (default 64; cpu-smoke 8); '
                   'other sizes get batch x (first/size)^2, a multiple of 8')
    p.add_argument('--warmup-steps', type=int, help='untimed steps incl. the compiling one (default 5; smoke 2)')
    p.add_argument('--steps', type=int, help='timed steps at most (default 30; cpu-smoke 3)')
    p.add_argument('--max-timed-s', type=float, help='longest timed region per measurement (default 8; smoke 2)')
    p.add_argument('--cache-images', type=int, help='distinct images in the synthetic cache (default 256; smoke 16)')
    p.add_argument('--workers', type=int, help='DataLoader workers (default 8 or the CPUs, if fewer; cpu-smoke 0)')
    p.add_argument('--amp', choices=['bf16', 'off'], help='bf16 autocast or float32 (default bf16; cpu-smoke off)')
    p.add_argument('--compile', choices=['on', 'off'], help='torch.compile the model (default on; cpu-smoke off)')
    p.add_argument('--max-batch', type=int, help='cap of the largest-batch search (default 2048; cpu-smoke 16)')
    p.add_argument('--budget-s', type=float, help='planned seconds for everything (default 420; cpu-smoke 40)')
    p.add_argument('--hard-limit-s', type=float, help='interrupt and write at this time (default 460; smoke 50)')
    p.add_argument('--min-start-s', type=float, help="share a model's first size needs to start (default 10; smoke 0)")
    p.add_argument('--matmul-sizes', nargs='+', type=int, help='square matmul sides for the peak (default 4096 8192 '
                   '16384; cpu-smoke 256 512)')
    p.add_argument('--loader-batches', type=int, help='batches timed for the data path alone (default 20; smoke 3)')
    p.add_argument('--device-transform', choices=['auto', 'augment', 'normalize'], default='auto',
                   help='device-side batch path: DeviceAugment (augment + normalise) when cxrlt.datasets has it\n'
                        '(auto), it or fail (augment), or normalize_batch only (normalize)')
    p.add_argument('--out', default='runs/gpu_throughput', help='output folder (default runs/gpu_throughput)')
    a = vars(p.parse_args(argv))
    defaults = SMOKE_DEFAULTS if a['cpu_smoke'] else GPU_DEFAULTS
    s = Settings(**{k: defaults[k] if a.get(k) is None and k in defaults else a[k] for k in a})
    s.models = s.models or ([backbone('resnet50').cpu_proxy] if s.cpu_smoke else [b.name for b in paper_backbones()])
    _check_settings(s, p)
    return s


def _check_settings(s:Settings, p:argparse.ArgumentParser) -> None:
    "An argparse error naming the first model or number that cannot be used."
    for name in s.models:
        try: backbone(name)
        except KeyError as e: p.error(str(e.args[0]))
    bad = [v for v in s.sizes if v < 32]
    if bad: p.error(f'--sizes must be >= 32 px, got {bad}')
    if min(s.batch_size, s.steps, s.warmup_steps, s.cache_images, s.max_batch, s.loader_batches) < 1 or s.workers < 0:
        p.error('batch size, steps, warm-up steps, cache images, max batch and loader batches must be >= 1, '
                'workers >= 0')
    if not 0 < s.budget_s <= s.hard_limit_s: p.error(f'need 0 < --budget-s <= --hard-limit-s, got {s.budget_s} and '
                                                     f'{s.hard_limit_s}')


def batch_for(size:int, s:Settings) -> int:
    "The batch at `size`: `s.batch_size` at the first size, scaled by the pixel ratio (a multiple of 8 from 8 up)."
    scaled = s.batch_size * (s.sizes[0] / size) ** 2
    return max(8, int(scaled) // 8 * 8) if s.batch_size >= 8 else max(1, int(scaled))


@dataclasses.dataclass
class Context:
    "What every measurement shares: the device, its data path, the caches, the peak and the clocks."
    settings: Settings
    device: torch.device
    t0: float                       # `time.perf_counter()` at the start of `main`
    autocast: object = None         # zero-argument autocast factory (`cxrlt.train.autocast_for`)
    transform: object = None        # uint8 (B, 1, S, S) device batch -> float (B, 3, S, S)
    transform_name: str = ''
    ids: list = None                # ImageIDs of the synthetic cache
    caches: dict = None             # size -> cache folder
    peak: dict = None               # the matmul peak measured in this run
    loader: list = None             # images/s of the data path alone, per size
    current: tuple = None           # the (model, size) being measured
    info: dict = None               # device, host and versions, gathered once
    loader_name: str = ''           # the cxrlt DataLoader factory used

    def elapsed(self) -> float: return time.perf_counter() - self.t0
    def left(self) -> float: return self.settings.budget_s - self.elapsed()


def log(ctx:Context, message:str) -> None:
    "A progress line, stamped with the seconds since the start."
    print(f'[{ctx.elapsed():6.1f} s] {message}', flush=True)


def sync(device:torch.device) -> None:
    "Wait for the device's queued work (a no-op on the CPU)."
    if device.type == 'cuda': torch.cuda.synchronize(device)


def is_oom(e:BaseException) -> bool:
    "Whether `e` reports running out of device memory (torch's error, or cuDNN / cuBLAS failing to allocate)."
    words = ('out of memory', 'ALLOC_FAILED', 'NOT_ENOUGH_WORKSPACE')
    return isinstance(e, torch.OutOfMemoryError) or isinstance(e, RuntimeError) and any(w in str(e) for w in words)


def free_memory(device:torch.device, forget_graphs:bool=False) -> None:
    "Collect garbage and return cached device memory (and drop torch.compile's graphs, which hold their model)."
    if forget_graphs: torch._dynamo.reset()
    gc.collect()
    if device.type == 'cuda': torch.cuda.empty_cache()


def device_info(device:torch.device) -> dict:
    "The device's name and size."
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        return dict(type='cuda', name=p.name, capability=f'{p.major}.{p.minor}', memory_gib=p.total_memory / 2**30,
                    multiprocessors=p.multi_processor_count)
    cpu = next((ln.split(':', 1)[1].strip() for ln in _cpuinfo() if ln.startswith('model name')), 'cpu')
    return dict(type='cpu', name=cpu, threads=torch.get_num_threads())


def _cpuinfo() -> list:
    try: return Path('/proc/cpuinfo').read_text().splitlines()
    except OSError: return []


def versions() -> dict:
    "Versions of Python, torch and its CUDA / cuDNN, timm, triton, numpy; the cxrlt commit."
    v = package_versions(['torch', 'torchvision', 'timm', 'triton', 'numpy'])
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return dict(python=sys.version.split()[0], cuda=torch.version.cuda, cudnn=cudnn, **v, cxrlt_git=git_state())


def matmul_peak(device:torch.device, dtype:torch.dtype, sides:list, seconds:float=0.5) -> dict:
    "The best TFLOP/s of square matmuls in `dtype` (2 n^3 FLOPs each): the device's peak as this run measures it."
    rates = []
    for n in sides:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        c = a @ b; sync(device)
        t = time.perf_counter(); torch.matmul(a, b, out=c); sync(device)
        reps = min(10_000, max(3, int(seconds / max(time.perf_counter() - t, 1e-6))))
        t = time.perf_counter()
        for _ in range(reps): torch.matmul(a, b, out=c)
        sync(device)
        rates.append(dict(n=n, reps=reps, tflops=2 * n**3 * reps / (time.perf_counter() - t) / 1e12))
        del a, b, c
    free_memory(device)
    return dict(dtype=str(dtype).removeprefix('torch.'), tflops=max(r['tflops'] for r in rates), by_size=rates)


def synthetic_pngs(folder:Path, n:int, side:int=256, seed:int=0) -> list:
    "Write `n` 16-bit greyscale PNGs (smooth waves plus noise); return their ImageIDs."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f'bench{i:05d}.png' for i in range(n)]
    for name in ids:
        waves = np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
        img = 30000 + 12000 * waves + rng.normal(0, 2000, (side, side))
        Image.fromarray(np.clip(img, 0, 65535).astype(np.uint16)).save(folder/name)
    return ids


def synthetic_caches(root:Path, sizes:list, n:int) -> tuple:
    "(ImageIDs, size -> folder): one uint8 cache per size, built by `cxrlt.cache.build_cache` from the same PNGs."
    ids = synthetic_pngs(root/'images', n)
    caches = {s: build_cache(ids, root/'images', root/f'cache{s}', size=s, workers=1, progress=False)['out']
              for s in sizes}
    return ids, caches


def device_transform(device:torch.device, choice:str='auto') -> tuple:
    "(transform, name) for uint8 device batches: `cxrlt.datasets.DeviceAugment` if it works, else `normalize_batch`."
    cls = getattr(cxrlt.datasets, 'DeviceAugment', None)
    if choice == 'augment' and cls is None: sys.exit('gpu_throughput: this cxrlt.datasets has no DeviceAugment')
    if choice == 'normalize' or cls is None: return normalize_batch, 'cxrlt.datasets.normalize_batch'
    try: return _checked_augment(cls(), device), 'cxrlt.datasets.DeviceAugment'
    except Exception as e:
        if choice == 'augment': raise
        why = f'{type(e).__name__}: {e}'
    print(f'cxrlt.datasets.DeviceAugment cannot be used ({why}); normalising with normalize_batch instead', flush=True)
    return normalize_batch, f'cxrlt.datasets.normalize_batch (DeviceAugment failed: {why})'


def _checked_augment(aug, device:torch.device):
    "`aug`, after checking that it turns a uint8 (2, 1, 64, 64) device batch into float32 (2, 3, 64, 64)."
    out = aug(torch.zeros(2, 1, 64, 64, dtype=torch.uint8, device=device))
    if not (out.dtype == torch.float32 and tuple(out.shape) == (2, 3, 64, 64)):
        raise TypeError(f'it returned {out.dtype} {tuple(out.shape)} for a uint8 (2, 1, 64, 64) batch; '
                        'expected float32 (2, 3, 64, 64)')
    return aug


def make_loader(ds, batch:int, workers:int, device:torch.device, seed:int=0):
    "The project's DataLoader of uint8 training rows: `train_loader` if cxrlt.datasets has it, else `cache_dataloader`."
    pin = device.type == 'cuda'
    if hasattr(cxrlt.datasets, 'train_loader'):
        return cxrlt.datasets.train_loader(ds, batch, num_workers=workers, drop_last=True, seed=seed, pin_memory=pin)
    return cache_dataloader(ds, batch, train=True, num_workers=workers, seed=seed, pin_memory=pin)


def training_batches(cache_dir, ids:list, batch:int, workers:int, device:torch.device, seed:int=0):
    "Endless (uint8 images, labels) batches on `device`, read from the cache as training reads them."
    rows = ids * max(1, math.ceil(4 * batch / len(ids)))
    labels = (np.random.default_rng(seed).random((len(rows), len(CLASSES))) < 0.1).astype(np.float32)
    ds = CachedImageDataset(cache_dir, rows, labels=labels, normalize=False)
    loader = make_loader(ds, batch, workers, device, seed)
    while True:
        for images, y in loader: yield images.to(device, non_blocking=True), y.to(device, non_blocking=True)


def loader_rate(ctx:Context, size:int) -> dict:
    "Images/s of the data path alone at `size`: cache -> uint8 batches -> device -> transform, no model."
    s, batch = ctx.settings, batch_for(size, ctx.settings)
    batches = training_batches(ctx.caches[size], ctx.ids, batch, s.workers, ctx.device)
    for _ in range(2): ctx.transform(next(batches)[0])       # start the workers
    sync(ctx.device)
    t = time.perf_counter()
    for _ in range(s.loader_batches): ctx.transform(next(batches)[0])
    sync(ctx.device)
    rate = s.loader_batches * batch / (time.perf_counter() - t)
    batches.close()
    return dict(size=size, batch_size=batch, img_s=rate)


def train_step(model, optimizer, images, labels, ctx:Context) -> torch.Tensor:
    "One step from a uint8 device batch: transform, channels_last, forward under autocast, BCE, backward, AdamW."
    x = ctx.transform(images)
    x = x.contiguous(memory_format=torch.channels_last)
    with ctx.autocast(): logits = model(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def build(name:str, size:int, ctx:Context) -> tuple:
    "(eager model, fused AdamW, model to run): a random cxrlt model, channels_last, compiled when asked."
    eager = create_model(name, num_classes=len(CLASSES), img_size=size).to(ctx.device).train()
    eager = eager.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-4, weight_decay=0.05, fused=ctx.device.type == 'cuda')
    if ctx.settings.compile == 'off': return eager, optimizer, eager
    torch._dynamo.reset()   # forget earlier models' graphs: timm blocks share code, recompiles add up to the limit
    return eager, optimizer, CompiledOrEager(eager)


def first_step(run, step, ctx:Context) -> tuple:
    "(compile note, seconds): the first step, where `CompiledOrEager` compiles, or falls back to eager with a message."
    t = time.perf_counter()
    step(run); sync(ctx.device)
    seconds = time.perf_counter() - t
    if getattr(run, 'error', None) is None: return ctx.settings.compile, seconds
    print(f'  torch.compile failed ({run.error[:300]}); this measurement ran eagerly', flush=True)
    return f'failed, ran eager: {run.error[:300]}', seconds


def timed_training(name:str, size:int, batch:int, ctx:Context, deadline:float) -> tuple:
    "(numbers, eager model, optimizer): build, warm up, then time training steps with batches from the cache."
    s = ctx.settings
    if ctx.device.type == 'cuda': torch.cuda.reset_peak_memory_stats(ctx.device)
    eager, optimizer, run = build(name, size, ctx)
    batches = training_batches(ctx.caches[size], ctx.ids, batch, s.workers, ctx.device)
    step = lambda m: train_step(m, optimizer, *next(batches), ctx)
    compiled, first_s = first_step(run, step, ctx)
    for _ in range(s.warmup_steps - 1): step(run)
    sync(ctx.device)
    n, t = 0, time.perf_counter()
    while n < s.steps:
        loss = step(run); n += 1
        now = time.perf_counter()
        if n >= 3 and (now - t > s.max_timed_s or now > deadline): break
    sync(ctx.device)
    seconds = time.perf_counter() - t
    batches.close()
    if not torch.isfinite(loss): raise FloatingPointError(f'{name} at {size} px: training loss is {loss.item()}')
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == 'cuda' else None
    return dict(batch_size=batch, warmup_steps=s.warmup_steps, timed_steps=n, timed_s=seconds,
                img_s=n * batch / seconds, step_ms=1000 * seconds / n, first_step_s=first_s, compile=compiled,
                peak_memory_gib=peak), eager, optimizer


def timed_with_oom_retry(name:str, size:int, ctx:Context, deadline:float) -> tuple:
    "`timed_training`, halving the batch (up to 3 times) after an out-of-memory error."
    batch = batch_for(size, ctx.settings)
    for _ in range(4):
        try: return timed_training(name, size, batch, ctx, deadline)
        except Exception as e:
            if not is_oom(e): raise
        free_memory(ctx.device, forget_graphs=True)   # out of the except block: the traceback's tensors are gone
        log(ctx, f'  out of memory at batch {batch}; retrying with {batch // 2}')
        batch //= 2
        if batch < 1: break
    raise RuntimeError(f'{name} at {size} px runs out of memory even at small batches')


def _step_at(model, optimizer, batch:int, size:int, ctx:Context) -> None:
    "One training step on a random device-resident batch (its tensors die with this frame)."
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=ctx.device)
    labels = (torch.rand(batch, len(CLASSES), device=ctx.device) < 0.1).float()
    train_step(model, optimizer, images, labels, ctx); sync(ctx.device)


def fits(model, optimizer, batch:int, size:int, ctx:Context) -> bool:
    "Whether one training step at `batch` runs without running out of memory (memory freed either way)."
    try: _step_at(model, optimizer, batch, size, ctx); ok = True
    except Exception as e:
        if not is_oom(e): raise
        ok = False
    optimizer.zero_grad(set_to_none=True)
    free_memory(ctx.device)
    return ok


def largest_batch(model, optimizer, size:int, start:int, ctx:Context, deadline:float) -> tuple:
    "(largest batch that fits, what stopped the search: 'oom', 'cap', 'budget' or an error), doubling from `start`."
    best, batch = start, start * 2
    while batch <= ctx.settings.max_batch:
        if time.perf_counter() > deadline: return best, 'budget'
        try:
            if not fits(model, optimizer, batch, size, ctx): return best, 'oom'
        except Exception as e:     # keep the timed numbers; the search's error is recorded and printed
            traceback.print_exc()
            free_memory(ctx.device)
            return best, f'error at batch {batch}: {type(e).__name__}: {e}'[:300]
        best, batch = batch, batch * 2
    return best, 'cap'


def empty_row(name:str, size:int, status:str, note:str='') -> dict:
    "A result row with every number None: a skipped or failed measurement, or the start of one."
    b = backbone(name)
    row = dict.fromkeys(RESULT_KEYS)
    row.update(model=name, timm_name=b.timm_name, paper_name=b.paper_name, size=size, status=status, note=note)
    return row


def measure(name:str, size:int, ctx:Context, deadline:float) -> dict:
    "Train `name` at `size` px: images/s, forward GFLOPs, TFLOP/s, MFU, peak memory and the largest batch."
    t = time.perf_counter()
    row = empty_row(name, size, 'ok')
    row['fwd_gflops_per_image'] = model_complexity(name, size, len(CLASSES))['gflops']
    numbers, eager, optimizer = timed_with_oom_retry(name, size, ctx, deadline)
    row.update(numbers)
    row['train_tflops'] = 3 * row['fwd_gflops_per_image'] * row['img_s'] / 1e3
    row['mfu'] = row['train_tflops'] / ctx.peak['tflops']
    row['max_batch'], row['max_batch_limited_by'] = largest_batch(eager, optimizer, size, row['batch_size'], ctx,
                                                                  deadline)
    del eager, optimizer
    free_memory(ctx.device, forget_graphs=True)
    row['seconds'] = time.perf_counter() - t
    return row


def measure_or_record(name:str, size:int, ctx:Context, deadline:float) -> dict:
    "`measure`, or a failed row naming the error (its traceback on stderr) so that the run goes on."
    ctx.current = (name, size)     # what `record_interruption` marks as failed if the hard limit stops it
    try: row = measure(name, size, ctx, deadline)
    except Exception as e:
        traceback.print_exc()
        free_memory(ctx.device, forget_graphs=True)
        row = empty_row(name, size, 'failed', f'{type(e).__name__}: {e}'[:500])
    ctx.current = None
    return row


def skip_reason(ctx:Context, deadline:float, previous_s) -> str:
    "Why the next size of a model does not start ('' when it does)."
    left = max(0.0, deadline - time.perf_counter())
    if ctx.left() <= 0: return f'run budget of {ctx.settings.budget_s:g} s spent'
    if previous_s is None and left < ctx.settings.min_start_s:
        return f"model's share of the budget: {left:.0f} s left, {ctx.settings.min_start_s:g} s needed to start"
    if previous_s is not None and left < previous_s:
        return f"model's share of the budget: {left:.0f} s left, its previous size took {previous_s:.0f} s"
    return ''


def progress_line(row:dict) -> str:
    "The line printed after a measurement."
    head = f"{row['model']} @ {row['size']} px"
    if row['status'] != 'ok': return f"{head}: {row['status']} ({row['note']})"
    mem = 'n/a' if row['peak_memory_gib'] is None else f"{row['peak_memory_gib']:.1f} GiB"
    return (f"{head}: batch {row['batch_size']}, {row['img_s']:.1f} img/s, {row['train_tflops']:.3g} TFLOP/s, "
            f"MFU {100 * row['mfu']:.1f} %, peak {mem}, max batch {row['max_batch']} ({row['max_batch_limited_by']}), "
            f"first step {row['first_step_s']:.1f} s (compile {row['compile'].split(':')[0]}), {row['seconds']:.0f} s")


def run_all(ctx:Context, rows:list, write) -> None:
    "Measure every model at every size within its share of the budget, writing the results after each one."
    s = ctx.settings
    for k, name in enumerate(s.models):
        deadline = time.perf_counter() + max(0.0, ctx.left()) / (len(s.models) - k)
        log(ctx, f'{name}: {deadline - time.perf_counter():.0f} s of the budget')
        previous = None
        for size in s.sizes:
            reason = skip_reason(ctx, deadline, previous)
            if reason: row = empty_row(name, size, 'skipped', reason)
            else:
                log(ctx, f'{name} @ {size} px: batch {batch_for(size, s)}, {deadline - time.perf_counter():.0f} s left')
                t = time.perf_counter()
                row = measure_or_record(name, size, ctx, deadline)
                previous = time.perf_counter() - t
            rows.append(row); write(complete=False)
            log(ctx, progress_line(row))


def record_interruption(ctx:Context, rows:list) -> None:
    "After the hard limit: the measurement in flight as failed, the ones not reached as skipped."
    done = {(r['model'], r['size']) for r in rows}
    for name in ctx.settings.models:
        for size in ctx.settings.sizes:
            if (name, size) in done: continue
            hit = (name, size) == ctx.current
            note = f'hard limit of {ctx.settings.hard_limit_s:g} s reached ' + ('during it' if hit else 'before it')
            rows.append(empty_row(name, size, 'failed' if hit else 'skipped', note))


def fmt(v, spec:str='.1f', unit:str='') -> str:
    "A number for the table, 'n/a' for None."
    return 'n/a' if v is None else f'{v:{spec}}{unit}'


def cell(text) -> str:
    "Text for a markdown table cell: one line, no column bars."
    return 'n/a' if text is None else ' '.join(str(text).split()).replace('|', '/')


def markdown(report:dict) -> str:
    "The results as a markdown page: settings, peak, data path, one table row per backbone x size."
    s, d, p = report['settings'], report['device'], report['peak']
    amp = 'bf16 autocast' if s['amp'] == 'bf16' else 'float32 (no autocast)'
    lines = [f"# Training throughput on {d['name']}", '',
             f"torch {report['versions']['torch']}, timm {report['versions']['timm']}; {amp}, "
             f"channels_last, {s['optimizer']}, torch.compile {s['compile']}; batches from a uint8 cache through "
             f"`CachedImageDataset(normalize=False)` and `{s['loader_used']}` ({s['workers']} workers), then "
             f"`{s['device_transform_used']}` on the device.", '',
             f"Peak ({p['dtype']} matmul, measured in this run): {p['tflops']:.3g} TFLOP/s; MFU is against it. "
             f"Forward FLOPs: {report['flops_source']}.", '',
             '| model | size | batch | img/s | fwd GFLOPs/img | TFLOP/s | MFU | peak mem (GiB) | max batch '
             '| first step (s) | compile | status |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|']
    for r in report['results']:
        mfu = None if r['mfu'] is None else 100 * r['mfu']
        batch = 'n/a' if r['max_batch'] is None else f"{r['max_batch']} ({r['max_batch_limited_by']})"
        status = cell(r['status'] + (f": {r['note']}" if r['note'] else ''))
        lines.append(f"| {r['model']} | {r['size']} | {fmt(r['batch_size'], 'd')} | {fmt(r['img_s'])} | "
                     f"{fmt(r['fwd_gflops_per_image'], '.3g')} | {fmt(r['train_tflops'], '.3g')} | "
                     f"{fmt(mfu, '.1f', ' %')} | "
                     f"{fmt(r['peak_memory_gib'])} | {batch} | {fmt(r['first_step_s'])} | {cell(r['compile'])} | "
                     f"{status} |")
    rates = ', '.join(f"{r['size']} px {r['img_s']:.0f} img/s" for r in report['loader'])
    b = report['budget']
    lines += ['', f'Data path alone (cache -> uint8 batches -> device -> transform): {rates}.', '',
              f"Budget: {b['planned_s']:g} s planned, hard limit {b['hard_limit_s']:g} s; {b['used_s']:.0f} s used; "
              f"{b['skipped']} skipped, {b['failed']} failed. {b['per_model']}", '']
    return '\n'.join(lines)


def report_dict(ctx:Context, rows:list, complete:bool) -> dict:
    "Everything the run measured, with the device, versions and settings that produced it."
    s = ctx.settings
    settings = {**dataclasses.asdict(s), 'batch_sizes': {str(v): batch_for(v, s) for v in s.sizes},
                'device_transform_used': ctx.transform_name, 'augment_config': getattr(ctx.transform, 'cfg', None),
                'loader_used': ctx.loader_name, 'channels_last': True,
                'torch_threads': torch.get_num_threads(),
                'optimizer': 'AdamW (fused)' if ctx.device.type == 'cuda' else 'AdamW (foreach)',
                'loss': 'BCE with logits over 30 classes, float32', 'cudnn_benchmark': ctx.device.type == 'cuda',
                'max_batch_search': 'eager single steps on device-resident random batches, doubling from the timed '
                                    'batch'}
    per_model = ('Each model gets the time left divided by the models left; a size starts only if that share still '
                 'holds as long as the previous size took; timed steps and the batch search stop at its end.')
    count = lambda status: sum(r['status'] == status for r in rows)
    budget = dict(planned_s=s.budget_s, hard_limit_s=s.hard_limit_s, used_s=ctx.elapsed(), per_model=per_model,
                  skipped=count('skipped'), failed=count('failed'))
    return dict(benchmark='gpu_throughput', schema_version=1, complete=complete,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                command=sys.argv, **ctx.info,
                settings=settings, flops_source=FLOPS_SOURCE, peak=ctx.peak, loader=ctx.loader or [], budget=budget,
                results=rows)


def write_report(ctx:Context, rows:list, complete:bool) -> None:
    "Write throughput.json and throughput.md to the output folder, each atomically."
    report, out = report_dict(ctx, rows, complete), Path(ctx.settings.out)
    save_json(report, out/'throughput.json')
    with atomic_write(out/'throughput.md') as f: f.write(markdown(report))


def arm_hard_limit(ctx:Context) -> None:
    "Raise `HardLimit` in the main thread when `hard_limit_s` has passed since the start."
    def stop(signum, frame): raise HardLimit()
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, ctx.settings.hard_limit_s - ctx.elapsed()))


def pick_device(s:Settings) -> torch.device:
    "The CPU for `--cpu-smoke`, else the current CUDA device (exit with a message when there is none)."
    if s.cpu_smoke: return torch.device('cpu')
    if not torch.cuda.is_available():
        sys.exit('gpu_throughput: no CUDA device here; run it on a GPU, or try the code path with --cpu-smoke')
    torch.backends.cudnn.benchmark = True
    return torch.device('cuda', torch.cuda.current_device())


def configure_threads(s:Settings) -> None:
    "One torch thread for `--cpu-smoke`: tiny tensors on shared cores lose more to a second thread than they gain."
    if s.cpu_smoke: torch.set_num_threads(1)


def prepare(ctx:Context, tmp:Path) -> None:
    "The data path, the matmul peak, the synthetic caches and the data path's own rate at each size."
    s = ctx.settings
    dtype = amp_dtype(ctx.device, s.amp)
    ctx.autocast = autocast_for(ctx.device, dtype)
    ctx.transform, ctx.transform_name = device_transform(ctx.device, s.device_transform)
    ctx.loader_name = 'cxrlt.datasets.' + ('train_loader' if hasattr(cxrlt.datasets, 'train_loader') else
                                          'cache_dataloader')
    ctx.peak = matmul_peak(ctx.device, dtype or torch.float32, s.matmul_sizes)
    log(ctx, f"{ctx.info['device']['name']}: {ctx.peak['dtype']} matmul peak {ctx.peak['tflops']:.3g} TFLOP/s; "
             f'device batches through {ctx.transform_name}')
    ctx.ids, ctx.caches = synthetic_caches(tmp, s.sizes, s.cache_images)
    ctx.loader = [loader_rate(ctx, size) for size in s.sizes]
    log(ctx, f'{s.cache_images} cached images at {s.sizes} px; data path alone: '
             + ', '.join(f"{r['size']} px {r['img_s']:.0f} img/s" for r in ctx.loader))


def main(argv=None) -> int:
    "Measure, then write throughput.json and throughput.md; 0 when written, 1 when the hard limit struck before any."
    s = parse_args(argv)
    configure_threads(s)
    ctx = Context(s, pick_device(s), time.perf_counter())
    ctx.info = dict(device=device_info(ctx.device), host=host_info(), versions=versions())
    rows, complete = [], False
    arm_hard_limit(ctx)
    try:
        with tempfile.TemporaryDirectory(prefix='gpu_throughput_') as tmp:
            prepare(ctx, Path(tmp))
            run_all(ctx, rows, lambda complete: write_report(ctx, rows, complete))
            complete = True
    except HardLimit:
        log(ctx, f'hard limit of {s.hard_limit_s:g} s reached; writing what was measured')
        record_interruption(ctx, rows)
    finally: signal.setitimer(signal.ITIMER_REAL, 0)
    if ctx.peak is None:
        log(ctx, 'stopped before the matmul peak was measured; nothing written')
        return 1
    write_report(ctx, rows, complete)
    log(ctx, f'wrote {Path(s.out)/"throughput.json"} and {Path(s.out)/"throughput.md"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
