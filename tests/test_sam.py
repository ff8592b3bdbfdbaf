"""Sharpness-aware minimisation in `cxrlt.train`: SAM and ASAM steps against the published rules computed by hand in
float64 (Foret et al., ICLR 2021; Kwon et al., ICML 2021), batch-norm statistics, optimizer state, two DDP processes,
`fit` with `sam_rho` (trains, records, resumes exactly) and the combinations it refuses."""
import io, json, re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from conftest import quiet_fit, tiny_challenge
from cxrlt.train import TrainConfig, _optimizer, train_one_epoch

pytestmark = pytest.mark.usefixtures('one_thread')
CPU = torch.device('cpu')


# ---------------------------------------------------------------- the published rules, by hand, in float64

def bce_grads(w, x, y):
    "Gradient in (W, b) of the mean BCE-with-logits of z = x·Wᵀ + b: with dz = (σ(z) − y) / (N·C), [dzᵀ·x, Σ dz]."
    W, b = w
    dz = (torch.sigmoid(x @ W.T + b) - y) / y.numel()
    return [dz.T @ x, dz.sum(0)]


def perturbation(w, g, rho, adaptive=False):
    "SAM's ε̂ = ρ·g/‖g‖₂ over all parameters together; ASAM's ε̂ = ρ·w²·g/‖|w|·g‖₂ (T_w = |w|)."
    t = [p.abs() if adaptive else torch.ones_like(p) for p in w]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    return [rho * ti ** 2 * gi / norm for ti, gi in zip(t, g)]


def sam_grads(w, x, y, rho, adaptive=False):
    "The gradient at w + ε̂, the one SAM's base optimizer steps with."
    eps = perturbation(w, bce_grads(w, x, y), rho, adaptive)
    return bce_grads([p + e for p, e in zip(w, eps)], x, y)


def clipped(g, max_norm):
    "torch's `clip_grad_norm_`: every gradient × min(1, max_norm / (‖g‖₂ + 1e-6))."
    total = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    return [gi * min(1.0, float(max_norm / (total + 1e-6))) for gi in g]


def sgd_nesterov(w, g, state, lr, wd, mu=0.9):
    "timm's 'sgd' (torch SGD, Nesterov): d = g + wd·w; buf = d, then μ·buf + d; w − lr·(d + μ·buf). No decay on biases."
    out = []
    for k, (p, gi) in enumerate(zip(w, g)):
        d = gi + (wd if p.ndim > 1 else 0.0) * p
        state[k] = d.clone() if k not in state else mu * state[k] + d
        out.append(p - lr * (d + mu * state[k]))
    return out


def adamw(w, g, state, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    "torch AdamW (decoupled decay, bias-corrected moments), no decay on biases as timm groups them."
    t = state['t'] = state.get('t', 0) + 1
    out = []
    for k, (p, gi) in enumerate(zip(w, g)):
        m = state[('m', k)] = b1 * state.get(('m', k), 0) + (1 - b1) * gi
        v = state[('v', k)] = b2 * state.get(('v', k), 0) + (1 - b2) * gi ** 2
        p = p * (1 - lr * (wd if p.ndim > 1 else 0.0))
        out.append(p - lr / (1 - b1 ** t) * m / (v.sqrt() / (1 - b2 ** t) ** 0.5 + eps))
    return out


def data(n=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), (torch.rand(n, 3, generator=g) < 0.4).double()


def linear():
    torch.manual_seed(0)
    return nn.Linear(5, 3).double()


def weights(model): return [p.detach().clone() for p in model.parameters()]


def constant_lr(opt): return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def loop(cfg, batches, **kw):
    "The float64 linear model after `train_one_epoch` over `batches` with `cfg`'s optimizer (SAM when `sam_rho`)."
    model = linear()
    opt = _optimizer(cfg, model)
    train_one_epoch(model, batches, nn.BCEWithLogitsLoss(), opt, constant_lr(opt), device=CPU, progress=False, **kw)
    return model, opt


def max_diff(a, b): return max(float((p - q).abs().max()) for p, q in zip(a, b))


# The loop computes the loss in float32 (for every model) and the library the perturbation's norm in float32, so the
# loop and the float64 reference agree to ~1e-9 here; each test also shows the reference telling SAM from its base.
TOL = 1e-7


def test_sam_steps_with_sgd_are_the_published_rule():
    """Two SAM steps, timm's SGD as base, weight decay, a binding gradient clip, a random augmentation on the device:
    the second pass reuses the augmented batch, the clip applies to the gradient at w + ε̂, the update starts at w."""
    x, y = data()
    g = torch.Generator().manual_seed(5)
    augmented = []

    def augment(batch):   # random each call: a second call for the same batch would give another tensor
        out = batch + 0.3 * torch.randn(batch.shape, generator=g, dtype=batch.dtype)
        augmented.append(out)
        return out

    cfg = TrainConfig(optimizer='sgd', lr=0.5, weight_decay=0.01, sam_rho=0.3)
    model, _ = loop(cfg, [(x[:8], y[:8]), (x[8:], y[8:])], grad_clip=0.05, batch_transform=augment)
    assert len(augmented) == 2   # one augmentation per batch, not per pass
    w, plain, state, plain_state, norms = weights(linear()), weights(linear()), {}, {}, []
    for xa, yb in zip(augmented, (y[:8], y[8:])):
        g = sam_grads(w, xa, yb, 0.3)
        norms.append(float(torch.sqrt(sum((gi ** 2).sum() for gi in g))))
        w = sgd_nesterov(w, clipped(g, 0.05), state, lr=0.5, wd=0.01)
        plain = sgd_nesterov(plain, clipped(bce_grads(plain, xa, yb), 0.05), plain_state, lr=0.5, wd=0.01)
    assert min(norms) > 0.05   # the clip binds on both steps
    assert max_diff(weights(model), w) < TOL
    assert max_diff(w, plain) > 1e-3   # the reference tells SAM from plain SGD by far more than the tolerance


def test_sam_steps_with_adamw_are_the_published_rule():
    "Three SAM steps with AdamW as base: the moments see only the gradients at w + ε̂, decay and steps start at w."
    x, y = data(24)
    batches = [(x[k:k + 8], y[k:k + 8]) for k in (0, 8, 16)]
    model, _ = loop(TrainConfig(optimizer='adamw', lr=0.05, weight_decay=0.1, sam_rho=0.5), batches)
    w, plain, state, plain_state = weights(linear()), weights(linear()), {}, {}
    for xb, yb in batches:
        w = adamw(w, sam_grads(w, xb, yb, 0.5), state, lr=0.05, wd=0.1)
        plain = adamw(plain, bce_grads(plain, xb, yb), plain_state, lr=0.05, wd=0.1)
    assert max_diff(weights(model), w) < TOL
    assert max_diff(w, plain) > 1e-3


def test_asam_step_is_kwon_et_al():
    "`sam_adaptive`: ε̂ = ρ·w²·g/‖|w|·g‖₂, here with SGD; SAM's isotropic ε̂ gives another step."
    x, y = data(8)
    model, _ = loop(TrainConfig(optimizer='sgd', lr=0.5, weight_decay=0.0, sam_rho=1.0, sam_adaptive=True), [(x, y)])
    w0 = weights(linear())
    asam = sgd_nesterov(w0, sam_grads(w0, x, y, 1.0, adaptive=True), {}, lr=0.5, wd=0.0)
    sam = sgd_nesterov(w0, sam_grads(w0, x, y, 1.0), {}, lr=0.5, wd=0.0)
    assert max_diff(weights(model), asam) < TOL
    assert max_diff(asam, sam) > 1e-3


def test_batch_norm_statistics_move_once_per_sam_step():
    "Running mean and variance after one SAM step: one update (momentum 0.1) from the batch at w; one batch counted."
    x, y = data(8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with torch.no_grad(): h = model[0](x)   # the first layer's output at w, what the first pass normalises
    opt = _optimizer(TrainConfig(optimizer='sgd', lr=0.5, sam_rho=0.5), model)
    train_one_epoch(model, [(x, y)], nn.BCEWithLogitsLoss(), opt, constant_lr(opt), device=CPU, progress=False)
    bn = model[1]
    assert torch.allclose(bn.running_mean, 0.1 * h.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * h.var(0, unbiased=True), rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1
    assert not torch.equal(model[0].weight, weights(nn.Sequential(linear()))[0])   # the step did move the weights


def test_sam_state_round_trips():
    "SAM's state_dict (the base's momentum buffers, ρ in its groups) loaded into a new optimizer resumes exactly."
    x, y = data(24)
    batches = [(x[k:k + 8], y[k:k + 8]) for k in (0, 8, 16)]
    cfg = TrainConfig(optimizer='adamw', lr=0.05, sam_rho=0.5)
    whole, _ = loop(cfg, batches)
    first, opt = loop(cfg, batches[:2])
    buffer = io.BytesIO()
    torch.save({'model': first.state_dict(), 'optimizer': opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    state = saved['optimizer']
    assert state['param_groups'][0]['rho'] == 0.5
    assert 'exp_avg' in state['state'][0] and 'old_p' not in state['state'][0]   # no perturbation kept
    model = linear()
    model.load_state_dict(saved['model'])
    opt = _optimizer(cfg, model)
    opt.load_state_dict(state)
    train_one_epoch(model, batches[2:], nn.BCEWithLogitsLoss(), opt, constant_lr(opt), device=CPU, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), whole.parameters()))


# ---------------------------------------------------------------- two DDP processes

def _ddp_worker(rank, world, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    x, y = data()
    model = linear()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(TrainConfig(optimizer='sgd', lr=0.5, weight_decay=0.01, sam_rho=0.3), model)
    batches = [(x[k:k + 8][rank::world], y[k:k + 8][rank::world]) for k in (0, 8)]   # each rank half of each batch
    train_one_epoch(ddp, batches, nn.BCEWithLogitsLoss(), opt, constant_lr(opt), device=CPU, progress=False)
    torch.save(weights(model), Path(out)/f'{rank}.pt')
    dist.destroy_process_group()


def test_two_processes_all_reduce_both_passes(tmp_path):
    """Two gloo processes, 4 images each, equal SAM on the 8-image batch: ε̂ from the all-reduced gradient, then the
    all-reduced gradient at w + ε̂. Per-process ε̂ (m-sharpness, m = 4) would be another step."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path/'init'), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path/f'{r}.pt') for r in range(2)]
    x, y = data()
    w, m_sharp, state, m_state = weights(linear()), weights(linear()), {}, {}
    for k in (0, 8):
        xb, yb = x[k:k + 8], y[k:k + 8]
        w = sgd_nesterov(w, sam_grads(w, xb, yb, 0.3), state, lr=0.5, wd=0.01)
        per_rank = [sam_grads(m_sharp, xb[r::2], yb[r::2], 0.3) for r in range(2)]
        m_sharp = sgd_nesterov(m_sharp, [(a + b) / 2 for a, b in zip(*per_rank)], m_state, lr=0.5, wd=0.01)
    assert max_diff(ranks[0], ranks[1]) == 0   # every rank stepped alike
    assert max_diff(ranks[0], w) < TOL
    assert max_diff(w, m_sharp) > 1e-4


# ---------------------------------------------------------------- fit and the CLI

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "96 training images cached at 32 px."
    return tiny_challenge(tmp_path_factory.mktemp('tiny'))


def sam_config(tiny, out, **kw):
    return TrainConfig.from_dict({'train_csv': str(tiny/'train.csv'), 'train_cache': str(tiny/'cache'),
                                  'out_dir': str(out), 'backbone': 'resnet10t', 'epochs': 2, 'batch_size': 16,
                                  'lr': 0.003, 'val_fraction': 0.25, 'deterministic': True, 'progress': False,
                                  'num_workers': 1, 'sam_rho': 0.05, **kw})


def outputs(run_dir):
    return (run_dir/'predictions.csv').read_bytes(), json.loads((run_dir/'metrics.json').read_text())['val']


class Interrupted(Exception): pass


def test_fit_with_sam_trains_records_it_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """`fit` with `sam_rho` trains (finite losses, other predictions than without SAM) and records the key; a run
    stopped right after its epoch-1 checkpoint, rerun, trains only epoch 2 and ends byte-identical."""
    import cxrlt.train
    from cxrlt.core import load_checkpoint
    ref = quiet_fit(sam_config(tiny, tmp_path, run_name='sam'))
    plain = quiet_fit(sam_config(tiny, tmp_path, run_name='plain', sam_rho=None))
    h = pd.read_csv(ref/'history.csv')
    assert len(h) == 2 and h.train_loss.notna().all() and (h.train_loss > 0).all()
    assert json.loads((ref/'manifest.json').read_text())['params']['sam_rho'] == 0.05
    assert json.loads((ref/'metrics.json').read_text())['params']['sam_rho'] == 0.05
    assert outputs(plain)[0] != outputs(ref)[0]

    log_epoch = cxrlt.train._log_epoch
    def stop_after_first(row, improved):
        log_epoch(row, improved)
        raise Interrupted('stopped after epoch 1')
    monkeypatch.setattr(cxrlt.train, '_log_epoch', stop_after_first)
    with pytest.raises(Interrupted): quiet_fit(sam_config(tiny, tmp_path, run_name='cut'))
    cut = tmp_path/'cut'
    last = load_checkpoint(cut/'last.pt')
    assert last['state']['epoch'] == 1 and last['optimizer']['param_groups'][0]['rho'] == 0.05
    monkeypatch.setattr(cxrlt.train, '_log_epoch', log_epoch)
    epochs = []
    def counted(*a, **kw):
        epochs.append(kw['desc'])
        return train_one_epoch(*a, **kw)
    monkeypatch.setattr(cxrlt.train, 'train_one_epoch', counted)
    quiet_fit(sam_config(tiny, tmp_path, run_name='cut'))
    assert epochs == ['epoch 2/2']   # resumed from last.pt, not trained again from the start
    assert len(json.loads((cut/'manifest.json').read_text())['resumed_at']) == 1
    assert outputs(cut) == outputs(ref)


def refused(capfd, *args, contains:str):
    "`cxrlt *args` exits 2 with one stderr line `cxrlt train: ...` containing `contains`."
    from cxrlt.cli import main
    capfd.readouterr()
    code = main([str(a) for a in args])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('cxrlt train: '), err
    assert contains in lines[0], lines[0]


@pytest.mark.parametrize('overrides, message', [
    (['sam_rho=0'], 'sam_rho must be in (0, inf), got 0.0'),
    (['sam_rho=-0.05'], 'sam_rho must be in (0, inf), got -0.05'),
    (['accum_steps=2'], 'sam_rho with accum_steps=2 is not supported: SAM perturbs the weights along the gradient'),
    (['amp=fp16'], 'sam_rho with amp=fp16 is not supported: its GradScaler unscales and checks one gradient'),
    (['sam_rho=null', 'sam_adaptive=true'], 'sam_adaptive=True needs sam_rho'),
])
def test_unsupported_combinations_are_refused_in_one_line(capfd, tiny, tmp_path, overrides, message):
    config = tmp_path/'run.yaml'
    config.write_text(yaml.safe_dump(sam_config(tiny, tmp_path/'runs', run_name='bad').to_dict()))
    refused(capfd, 'train', '--config', config, *overrides, contains=message)
    assert not (tmp_path/'runs'/'bad').exists()


def test_float16_chosen_by_amp_auto_is_refused_before_the_run_starts(tiny, tmp_path, monkeypatch):
    "On a GPU without bfloat16 amp='auto' means float16: `fit` refuses SAM there before it makes the run folder."
    import cxrlt.train
    settings = cxrlt.train.device_settings
    monkeypatch.setattr(cxrlt.train, 'device_settings', lambda *a, **kw: {**settings(*a, **kw), 'amp': 'fp16'})
    with pytest.raises(ValueError, match=re.escape("sam_rho with amp=fp16 (what amp='auto' gives on a GPU without")):
        cxrlt.train.fit(sam_config(tiny, tmp_path, run_name='auto'))
    assert not (tmp_path/'auto').exists()
