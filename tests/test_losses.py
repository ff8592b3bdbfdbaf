"""cxrlt.losses against float64 references written by hand, one (image, class) element at a time,
straight from the papers' formulas (Cui et al. 2019, Lin et al. 2017, Ridnik et al. 2021, Cao et al. 2019,
Menon et al. 2021, Wu et al. 2020)."""
import math

import numpy as np
import pandas as pd
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from scipy import special
from sklearn.metrics import average_precision_score

import cxrlt.losses
from cxrlt.labels import CLASSES
from cxrlt.losses import (DRW, DRW_MODES, LOSSES, AsymmetricLoss, BCELoss, FocalLoss, LDAMDRWLoss, LDAMLoss,
                          LogitAdjustedBCE, MultiLabelLoss, NegativeTolerantBCE, bce, class_balanced_weights,
                          class_counts, ldam_margins, loss_class, make_loss, without_drw)

B, C = 6, 30
N_IMAGES = 60_000


# ---------------------------------------------------------------- float64 references, element by element
def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def ref_bce(z, y, pos_weight=1.0):
    p = sigmoid(z)
    return -(pos_weight * y * math.log(p) + (1 - y) * math.log(1 - p))


def ref_focal(z, y, gamma, alpha=None):
    p = sigmoid(z)
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    return -(a_pos * y * (1 - p) ** gamma * math.log(p) + a_neg * (1 - y) * p ** gamma * math.log(1 - p))


def ref_asl(z, y, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8):
    """Ridnik et al. 2021: p_m = max(p - m, 0); -[y (1-p)^γ+ log p + (1-y) p_m^γ- log(1-p_m)],
    probabilities clamped at eps in the logs."""
    p = sigmoid(z)
    p_m = max(p - clip, 0.0)
    pos = (1 - p) ** gamma_pos * math.log(max(p, eps))
    neg = p_m ** gamma_neg * math.log(max(1 - p_m, eps))
    return -(y * pos + (1 - y) * neg)


def ref_cb_weights(counts, beta):
    w = [(1 - beta) / (1 - beta ** n) for n in counts]
    return [v * len(w) / sum(w) for v in w]


def ref_margins(counts, max_m):
    raw = [n ** -0.25 for n in counts]
    return [max_m * r / max(raw) for r in raw]


def ref_ldam(z, y, margin, s):
    "Positive-side margin, scaled, sigmoid BCE: y log(1+e^{-s(z-Δ)}) + (1-y) log(1+e^{s z})."
    return y * math.log(1 + math.exp(-s * (z - margin))) + (1 - y) * math.log(1 + math.exp(s * z))


def ref_logit_adjusted(z, y, n, n_images, tau, adjustment):
    pi = n / n_images
    shift = math.log(pi / (1 - pi)) if adjustment == 'log_odds' else math.log(pi)
    return ref_bce(z + tau * shift, y)


def ref_ntr(z, y, n, n_images, neg_scale, init_bias):
    pi = n / n_images
    zb = z + init_bias / neg_scale * math.log(pi / (1 - pi))
    return y * math.log(1 + math.exp(-zb)) + (1 - y) / neg_scale * math.log(1 + math.exp(neg_scale * zb))


def elementwise(f, z, y, per_class=None, **kw):
    "Apply a scalar reference to every element; `per_class` maps column j to extra keyword arguments."
    out = np.zeros(z.shape)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            extra = per_class(j) if per_class else {}
            out[i, j] = f(float(z[i, j]), float(y[i, j]), **kw, **extra)
    return out


def reduce(e, weight=None, reduction='mean'):
    if weight is not None: e = e * np.asarray(weight)[None, :]
    return {'mean': e.mean(), 'sum': e.sum(), 'none': e}[reduction]


def ref_drw(e, y, cb, mode, own=None, reduction='mean'):
    """Deferred re-weighting of a reference element-wise loss `e`, once active: 'positive' weights each positive
    of class j by cb_j and each negative by 1 (BCE's pos_weight); 'column' weights all of column j by cb_j."""
    cb = np.asarray(cb)[None, :]
    e = e * np.where(y == 1, cb, 1.0) if mode == 'positive' else e * cb
    return reduce(e, own, reduction)


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def rng():
    return np.random.default_rng(20260303)


@pytest.fixture
def counts(rng):
    "Long-tailed per-class counts: from tens of thousands down to a handful."
    return np.sort(np.round(rng.lognormal(6, 2, C)).clip(2, N_IMAGES // 2))[::-1].copy()


def batch(rng, scale=3.0, p_pos=0.3, rows=B, cols=C):
    z = rng.normal(0, scale, (rows, cols))
    y = (rng.random((rows, cols)) < p_pos).astype(np.float64)
    y[0] = 0  # an image with none of the findings
    return z, y


def f32_exact(rng, lo, hi, n=C):
    "Random per-class values exactly representable in float32 (the losses keep weights in float32)."
    return rng.uniform(lo, hi, n).astype(np.float32).astype(np.float64)


def t(a, dtype=torch.float64):
    return torch.tensor(a, dtype=dtype)


# ---------------------------------------------------------------- class counts, weights and margins
@pytest.mark.parametrize('beta', [0.0, 0.9, 0.999, 0.9999])
def test_class_balanced_weights_match_effective_number_formula(counts, beta):
    w = class_balanced_weights(counts, beta).double().numpy()
    np.testing.assert_allclose(w, ref_cb_weights(counts, beta), rtol=1e-6)
    assert w.sum() == pytest.approx(C, rel=1e-6)
    assert np.all(np.diff(w) >= -1e-6)  # counts are sorted high → low, so weights rise


def test_class_balanced_weights_inverse_frequency_limit():
    # β → 1: (1-β)/(1-β^n) → 1/n
    w = class_balanced_weights([1, 2, 4], beta=1 - 1e-9).double().numpy()
    np.testing.assert_allclose(w, np.array([1, .5, .25]) * 3 / 1.75, rtol=1e-5)


def test_ldam_margins_decrease_with_count(counts):
    m = ldam_margins(counts, max_m=0.5).double().numpy()
    np.testing.assert_allclose(m, ref_margins(counts, 0.5), rtol=1e-6)
    assert m.max() == pytest.approx(0.5, rel=1e-7)
    order = np.argsort(counts)
    assert np.all(np.diff(m[order]) <= 1e-9), 'margins must not grow with the count'
    assert m[np.argmin(counts)] > m[np.argmax(counts)]
    # 16 times more images → half the margin (n^-1/4)
    m2 = ldam_margins([10, 160], max_m=0.3).double().numpy()
    assert m2[1] / m2[0] == pytest.approx(0.5, rel=1e-6)


def test_counts_by_class_name_are_put_in_column_order():
    s = pd.Series({c: i + 1 for i, c in enumerate(CLASSES)}).iloc[::-1]
    np.testing.assert_array_equal(class_counts(s), np.arange(1, 31))
    m = ldam_margins(s).numpy()
    assert m[0] == pytest.approx(0.5)  # 'Normal' has the single positive here → the largest margin


def test_bad_counts_name_the_class():
    bad = [100] * 30
    bad[11] = 0
    with pytest.raises(ValueError, match=r"class 11 \('Hernia'\) has 0.0; expected a positive number"):
        class_balanced_weights(bad)
    with pytest.raises(ValueError, match=r"class 2 has nan"):
        LDAMLoss([3, 4, float('nan')])
    with pytest.raises(ValueError, match='missing'):
        class_counts(pd.Series({'Normal': 3, 'Hernia': 2}))
    with pytest.raises(ValueError, match=r'1-D'):
        class_counts([[1, 2], [3, 4]])


# ---------------------------------------------------------------- BCE and focal loss
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_bce_matches_reference(rng, reduction):
    z, y = batch(rng)
    w, pw = f32_exact(rng, 0.2, 3), f32_exact(rng, 0.5, 5)
    ref = reduce(elementwise(ref_bce, z, y, per_class=lambda j: {'pos_weight': pw[j]}), w, reduction)
    got = bce(t(z), t(y), weight=w, pos_weight=pw, reduction=reduction)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    got = BCELoss(weight=w, pos_weight=pw, reduction=reduction)(t(z, torch.float32), t(y, torch.float32))
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize('gamma,alpha', [(0.0, None), (1.0, None), (2.0, 0.25), (0.5, 0.75), (3.0, None)])
def test_focal_matches_reference(rng, gamma, alpha):
    z, y = batch(rng)
    ref = elementwise(ref_focal, z, y, gamma=gamma, alpha=alpha)
    got = FocalLoss(gamma, alpha, reduction='none')(t(z), t(y))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_focal_gamma_zero_is_bce(rng):
    z, y = batch(rng)
    np.testing.assert_allclose(FocalLoss(0.0)(t(z), t(y)).item(), reduce(elementwise(ref_bce, z, y)), rtol=1e-10)


# ---------------------------------------------------------------- Asymmetric Loss
@pytest.mark.parametrize('params', [
    dict(),                                                   # the paper's defaults (4, 1, 0.05, 1e-8)
    dict(gamma_neg=2.0, gamma_pos=0.0, clip=0.1),
    dict(gamma_neg=0.5, gamma_pos=0.5, clip=0.2, eps=1e-4),   # non-integer exponents, a coarse eps
    dict(gamma_neg=4.0, gamma_pos=1.0, clip=0.0),
    dict(gamma_neg=0.0, gamma_pos=2.0, clip=0.05),
])
@pytest.mark.parametrize('reduction', ['sum', 'mean', 'none'])
def test_asl_matches_reference(rng, params, reduction):
    z, y = batch(rng, scale=4.0)
    w = f32_exact(rng, 0.1, 2)
    ref = reduce(elementwise(ref_asl, z, y, **params), w, reduction)
    got = AsymmetricLoss(**params, weight=w, reduction=reduction)(t(z), t(y))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
    got32 = AsymmetricLoss(**params, weight=w, reduction=reduction)(t(z, torch.float32), t(y, torch.float32))
    np.testing.assert_allclose(got32.double().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_asl_default_reduction_is_the_reference_sum(rng):
    z, y = batch(rng)
    assert AsymmetricLoss().reduction == 'sum'
    np.testing.assert_allclose(AsymmetricLoss()(t(z), t(y)).item(), elementwise(ref_asl, z, y).sum(), rtol=1e-10)


def test_asl_eps_clamp_matches_reference_at_extreme_logits():
    # σ(-25) ≈ 1.4e-11 < eps: the reference clamps log p at log(1e-8); so must we
    z, y = np.array([[-25.0, 25.0, -40.0]]), np.array([[1.0, 0.0, 1.0]])
    ref = elementwise(ref_asl, z, y, clip=0.0)
    np.testing.assert_allclose(AsymmetricLoss(clip=0.0, reduction='none')(t(z), t(y)).numpy(), ref, rtol=1e-10)
    assert ref[0, 0] == pytest.approx(-math.log(1e-8), rel=1e-6)


def test_asl_special_cases(rng):
    z, y = batch(rng)
    summed_bce = elementwise(ref_bce, z, y).sum()
    np.testing.assert_allclose(AsymmetricLoss(0, 0, 0)(t(z), t(y)).item(), summed_bce, rtol=1e-10)
    for gamma in (0.5, 1.0, 2.0, 4.0):
        summed_focal = elementwise(ref_focal, z, y, gamma=gamma).sum()
        np.testing.assert_allclose(AsymmetricLoss(gamma, gamma, 0)(t(z), t(y)).item(), summed_focal, rtol=1e-10)
        np.testing.assert_allclose(AsymmetricLoss(gamma, gamma, 0)(t(z), t(y)).item(),
                                   FocalLoss(gamma, reduction='sum')(t(z), t(y)).item(), rtol=1e-10)


def test_asl_hard_negatives_cost_more_than_easy_ones():
    asl = AsymmetricLoss(reduction='none')
    p = np.linspace(0.06, 0.99, 50)             # all above the clip 0.05
    z = t(np.log(p / (1 - p))[None, :])
    loss = asl(z, torch.zeros_like(z)).numpy()[0]
    assert np.all(np.diff(loss) > 0), 'a negative predicted with higher probability must cost more'
    assert loss[-1] > 100 * loss[0]
    # the inverted focusing term (1 - p_m)^γ- found in some public CXR-LT code would rank them the other way round
    inverted = [(1 - (pi - 0.05)) ** 4 * -math.log(1 - (pi - 0.05)) for pi in (0.9, 0.1)]
    ours = asl(t([[math.log(9), math.log(1 / 9)]]), t([[0., 0.]])).numpy()[0]
    assert ours[0] > ours[1] and inverted[0] < inverted[1]


def test_asl_discards_easy_negatives_below_the_clip():
    z = torch.tensor([[math.log(0.04 / 0.96), -3.0, -10.0]], dtype=torch.float64, requires_grad=True)
    loss = AsymmetricLoss(reduction='sum')(z, torch.zeros_like(z))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(z.grad == 0)


def test_asl_gradient_matches_finite_differences_of_the_reference(rng):
    z, y = batch(rng, scale=2.0, rows=3, cols=8)
    p = 1 / (1 + np.exp(-z))
    z[np.abs(p - 0.05) < 0.01] += 1.0              # keep away from the clip's kink
    zt = t(z).requires_grad_(True)
    AsymmetricLoss(gamma_neg=3.0, gamma_pos=1.5, clip=0.05)(zt, t(y)).backward()
    h = 1e-6
    num = np.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            num[i, j] = (ref_asl(z[i, j] + h, y[i, j], 3.0, 1.5) - ref_asl(z[i, j] - h, y[i, j], 3.0, 1.5)) / (2 * h)
    np.testing.assert_allclose(zt.grad.numpy(), num, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- LDAM
@pytest.mark.parametrize('max_m,s', [(0.5, 30.0), (0.3, 10.0), (1.0, 1.0)])
def test_ldam_matches_reference(rng, counts, max_m, s):
    z = rng.uniform(-1, 1, (B, C))                  # cosine logits
    y = (rng.random((B, C)) < 0.3).astype(np.float64)
    y[0] = 0
    m = ref_margins(counts, max_m)
    ref = elementwise(ref_ldam, z, y, per_class=lambda j: {'margin': m[j]}, s=s)
    got = LDAMLoss(counts, max_m=max_m, s=s, reduction='none')(t(z), t(y))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6 * s)  # margins are kept in float32
    np.testing.assert_allclose(LDAMLoss(counts, max_m, s)(t(z), t(y)).item(), ref.mean(), rtol=1e-6)


def test_ldam_margin_only_touches_positives(counts):
    loss = LDAMLoss(counts, reduction='none')
    z = torch.full((1, C), 0.2, dtype=torch.float64)
    neg = loss(z, torch.zeros_like(z)).numpy()[0]
    np.testing.assert_allclose(neg, math.log(1 + math.exp(30 * 0.2)), rtol=1e-12)  # same for every class
    pos = loss(z, torch.ones_like(z)).numpy()[0]
    rare, common = np.argmin(counts), np.argmax(counts)
    assert pos[rare] > pos[common], 'the rarer class has the larger margin, so the same logit costs more'


def test_ldam_probabilities_are_sigmoid_of_scaled_logits():
    z = np.array([[-0.4, 0.0, 0.05, 0.9]])
    loss = LDAMLoss([1, 10, 100, 1000], s=30.0)
    np.testing.assert_allclose(loss.probabilities(t(z)).double().numpy(), [[sigmoid(30 * v) for v in z[0]]], rtol=1e-6)
    # and DRW keeps them
    np.testing.assert_allclose(DRW(loss, [1, 10, 100, 1000], 3).probabilities(t(z)).numpy(),
                               loss.probabilities(t(z)).numpy())
    assert BCELoss().probabilities(t([[0.0]])).item() == 0.5


# ---------------------------------------------------------------- logit adjustment and negative-tolerant BCE
@pytest.mark.parametrize('tau,adjustment',
                         [(1.0, 'log_odds'), (0.5, 'log_odds'), (1.0, 'log_prior'), (2.0, 'log_prior')])
def test_logit_adjusted_bce_matches_reference(rng, counts, tau, adjustment):
    z, y = batch(rng)
    ref = elementwise(ref_logit_adjusted, z, y, per_class=lambda j: {'n': counts[j]}, n_images=N_IMAGES, tau=tau,
                      adjustment=adjustment)
    got = LogitAdjustedBCE(counts, N_IMAGES, tau=tau, adjustment=adjustment, reduction='none')(t(z), t(y))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_logit_adjustment_favours_rare_classes_at_inference():
    # the same raw logit is trained as a much lower one for a rare class: a rare positive costs more,
    # pushing its raw logit up; predictions use σ(z) without the shift
    la = LogitAdjustedBCE([30_000, 30], N_IMAGES, reduction='none')
    loss = la(t([[0.0, 0.0]]), t([[1.0, 1.0]])).numpy()[0]
    assert loss[1] > loss[0]
    assert la.probabilities(t([[0.0]])).item() == 0.5


@pytest.mark.parametrize('neg_scale,init_bias', [(2.0, 0.05), (5.0, 0.1), (1.0, 0.0)])
def test_negative_tolerant_bce_matches_reference(rng, counts, neg_scale, init_bias):
    z, y = batch(rng)
    ref = elementwise(ref_ntr, z, y, per_class=lambda j: {'n': counts[j]}, n_images=N_IMAGES, neg_scale=neg_scale,
                      init_bias=init_bias)
    got = NegativeTolerantBCE(counts, N_IMAGES, neg_scale, init_bias, reduction='none')(t(z), t(y))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)


def test_negative_tolerant_bce_without_regularisation_is_bce(rng, counts):
    z, y = batch(rng)
    got = NegativeTolerantBCE(counts, N_IMAGES, neg_scale=1.0, init_bias=0.0)(t(z), t(y)).item()
    assert got == pytest.approx(elementwise(ref_bce, z, y).mean(), rel=1e-10)


# ---------------------------------------------------------------- DRW, weights, factory
def _build(name, counts, **kw):
    extra = {'n_images': N_IMAGES} if name in ('logit_adjusted_bce', 'negative_tolerant_bce') else {}
    return make_loss(name, counts, **extra, **kw)


def _reference(name, z, y, counts):
    "The float64 reference element-wise loss of each factory name with its defaults."
    if name == 'bce': return elementwise(ref_bce, z, y)
    if name == 'focal': return elementwise(ref_focal, z, y, gamma=2.0)
    if name == 'asl': return elementwise(ref_asl, z, y)
    if name in ('ldam', 'ldam_drw', 'ldam_as_coded', 'ldam_drw_as_coded'):   # one formula; the head differs
        m = ref_margins(counts, 0.5)
        return elementwise(ref_ldam, z, y, per_class=lambda j: {'margin': m[j]}, s=30.0)
    if name == 'logit_adjusted_bce':
        return elementwise(ref_logit_adjusted, z, y, per_class=lambda j: {'n': counts[j]}, n_images=N_IMAGES, tau=1.0,
                           adjustment='log_odds')
    if name == 'negative_tolerant_bce':
        return elementwise(ref_ntr, z, y, per_class=lambda j: {'n': counts[j]}, n_images=N_IMAGES, neg_scale=2.0,
                           init_bias=0.05)
    raise KeyError(name)


@pytest.mark.parametrize('mode', [None, 'positive', 'column'])   # None: make_loss's default, 'positive'
@pytest.mark.parametrize('name', list(LOSSES))
def test_drw_uniform_then_class_balanced_for_every_loss(rng, counts, name, mode):
    z = rng.uniform(-1, 1, (B, C)) if name.startswith('ldam') else rng.normal(0, 3, (B, C))
    y = (rng.random((B, C)) < 0.3).astype(np.float64)
    y[0] = 0
    loss = _build(name, counts, drw_start_epoch=3, drw_beta=0.999, **({} if mode is None else {'drw_mode': mode}))
    assert isinstance(loss, DRW)
    ref = _reference(name, z, y, counts)
    red = loss.reduction
    w = np.array(ref_cb_weights(counts, 0.999))
    for epoch, active in [(0, False), (2, False), (3, True), (7, True)]:
        got = loss.set_epoch(epoch)(t(z), t(y))
        want = ref_drw(ref, y, w, mode or 'positive', reduction=red) if active else reduce(ref, None, red)
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-6, err_msg=f'{name} epoch {epoch}')
        assert loss.active == active
    assert loss.mode == (mode or 'positive')


def test_drw_multiplies_the_wrapped_losses_own_weight(rng, counts):
    z, y = batch(rng)
    own = f32_exact(rng, 0.5, 2)
    drw = DRW(FocalLoss(2.0, weight=own, reduction='sum'), counts, start_epoch=1)
    ref = elementwise(ref_focal, z, y, gamma=2.0)
    np.testing.assert_allclose(drw(t(z), t(y)).item(), reduce(ref, own, 'sum'), rtol=1e-9)
    cb = np.array(ref_cb_weights(counts, 0.9999))
    np.testing.assert_allclose(drw.set_epoch(1)(t(z), t(y)).item(), ref_drw(ref, y, cb, 'positive', own, 'sum'),
                               rtol=1e-6)
    np.testing.assert_allclose(drw.elementwise(t(z), t(y)).numpy(), ref, rtol=1e-9)
    column = DRW(FocalLoss(2.0, weight=own, reduction='sum'), counts, start_epoch=1, mode='column').set_epoch(1)
    np.testing.assert_allclose(column(t(z), t(y)).item(), reduce(ref, own * cb, 'sum'), rtol=1e-6)
    # per element, with reduction 'none': own_j * cb_j on a positive, own_j on a negative ('positive'); own_j * cb_j
    none = DRW(FocalLoss(2.0, weight=own, reduction='none'), counts, start_epoch=0)
    np.testing.assert_allclose(none(t(z), t(y)).numpy(), ref * own * np.where(y == 1, cb, 1.0), rtol=1e-6)


def test_drw_rejects_bad_epochs_and_losses(counts):
    with pytest.raises(ValueError, match='start_epoch must be an integer >= 0'):
        DRW(BCELoss(), counts, start_epoch=-1)
    with pytest.raises(ValueError, match='epoch must be an integer >= 0'):
        DRW(BCELoss(), counts, start_epoch=1).set_epoch(1.5)
    with pytest.raises(ValueError, match='DRW counts have 30 classes but the wrapped loss has 3'):
        DRW(LDAMLoss([1, 2, 3]), counts, start_epoch=1)
    with pytest.raises(TypeError, match='DRW wraps a cxrlt.losses loss'):
        DRW(torch.nn.BCEWithLogitsLoss(), counts, start_epoch=1)
    with pytest.raises(ValueError, match=r"DRW mode must be one of \('positive', 'column'\) \('positive': the "
                                         r"class-balanced weight multiplies each class's positive term.*got 'pos'"):
        DRW(BCELoss(), counts, start_epoch=1, mode='pos')
    with pytest.raises(ValueError, match="DRW mode must be one of .* got 'Column'"):
        make_loss('bce', counts, drw_start_epoch=1, drw_mode='Column')
    with pytest.raises(ValueError, match="got None"):
        make_loss('bce', counts, drw_mode=None)   # checked with or without DRW


# ---------------------------------------------------------------- DRW's modes against independent references
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_drw_positive_is_bce_with_pos_weight(rng, counts, reduction):
    "BCE in DRW ('positive', the default) once active is torch's BCE with pos_weight = the class-balanced weights."
    z, y = batch(rng)
    w = t(ref_cb_weights(counts, 0.999))
    drw = DRW(BCELoss(reduction=reduction), counts, start_epoch=2, beta=0.999).set_epoch(2)
    want = F.binary_cross_entropy_with_logits(t(z), t(y), pos_weight=w, reduction=reduction)
    np.testing.assert_allclose(drw(t(z), t(y)).numpy(), want.numpy(), rtol=2e-7, atol=1e-12)
    # 'column' is torch's BCE with weight = the class-balanced weights, broadcast over the rows
    column = DRW(BCELoss(reduction=reduction), counts, start_epoch=2, beta=0.999, mode='column').set_epoch(2)
    want = F.binary_cross_entropy_with_logits(t(z), t(y), weight=w[None, :], reduction=reduction)
    np.testing.assert_allclose(column(t(z), t(y)).numpy(), want.numpy(), rtol=2e-7, atol=1e-12)
    assert not np.allclose(drw(t(z), t(y)).numpy(), column(t(z), t(y)).numpy(), rtol=1e-3)


def test_ldam_drw_positive_matches_a_float64_formula(rng, counts):
    z = rng.uniform(-1, 1, (B, C))
    y = (rng.random((B, C)) < 0.3).astype(np.float64)
    own = f32_exact(rng, 0.5, 2)
    s, margins, cb = 30.0, np.array(ref_margins(counts, 0.5)), np.array(ref_cb_weights(counts, 0.9999))
    per_element = y * np.log1p(np.exp(-s * (z - margins))) + (1 - y) * np.log1p(np.exp(s * z))
    want = (own * (1 + y * (cb - 1)) * per_element).mean()
    loss = make_loss('ldam_drw', counts, drw_start_epoch=0, weight=own)
    np.testing.assert_allclose(loss(t(z), t(y)).item(), want, rtol=2e-6)
    column = make_loss('ldam_drw', counts, drw_start_epoch=0, weight=own, drw_mode='column')
    np.testing.assert_allclose(column(t(z), t(y)).item(), (own * cb * per_element).mean(), rtol=2e-6)


def _minimise_constant_logits(loss, y):
    "The constant logit per class minimising `loss` on labels `y`, by scipy's BFGS on the loss and its gradient."
    def f(b):
        bt = t(b).requires_grad_(True)
        v = loss(bt.expand(y.shape[0], -1), t(y))
        v.backward()
        return v.item(), bt.grad.numpy()
    res = scipy.optimize.minimize(f, np.zeros(y.shape[1]), jac=True, method='BFGS', options={'gtol': 1e-13})
    return res.x


@pytest.mark.parametrize('mode', [None, 'column'])   # None: the default, 'positive'
def test_drw_constant_logit_optimum_matches_closed_form(mode):
    """One constant logit per class fitted to n+ positives and n- negatives: 'positive' moves it to
    logit(w n+ / (w n+ + n-)), 'column' leaves it at logit(n+ / (n+ + n-)), the unweighted optimum."""
    n_pos, n = np.array([300, 60, 12, 3]), 400
    y = (np.arange(n)[:, None] < n_pos[None, :]).astype(np.float64)
    w = np.array(ref_cb_weights(n_pos, 0.999))
    assert w.min() < 0.5 and w.max() > 2       # weights far from 1 both ways
    drw = DRW(BCELoss(), n_pos, start_epoch=0, beta=0.999, **({} if mode is None else {'mode': mode}))
    got = _minimise_constant_logits(drw, y)
    n_neg = n - n_pos
    want = special.logit(w * n_pos / (w * n_pos + n_neg)) if mode is None else special.logit(n_pos / n)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_minimise_constant_logits(BCELoss(), y), special.logit(n_pos / n), rtol=0, atol=1e-5)


def _adamw_cosine_head(loss, x, y, steps=100, seed=0):
    from cxrlt.models import NormedLinear
    torch.manual_seed(seed)
    head = NormedLinear(x.shape[1], y.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    init = head.weight.detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        loss(head(x), y).backward()
        opt.step()
    return init, head.weight.detach().clone()


def test_drw_column_weights_change_nothing_under_adamw_positive_weights_do():
    """A cosine head trained from one seed with LDAM, LDAM-DRW (default 'positive') and LDAM-DRW 'column', DRW
    active from the first step: AdamW is invariant to a per-row gradient scale, so 'column' ends where LDAM does."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 16, generator=g)
    y = (torch.rand(256, 5, generator=g) < torch.tensor([0.5, 0.2, 0.08, 0.03, 0.01])).float()
    y[0] = 1
    counts = y.sum(0).numpy()
    init, plain = _adamw_cosine_head(LDAMLoss(counts), x, y)
    assert (plain - init).abs().max() > 0.1    # training moved the head
    _, positive = _adamw_cosine_head(DRW(LDAMLoss(counts), counts, start_epoch=0), x, y)
    assert (positive - plain).abs().max() > 1e-2
    _, column = _adamw_cosine_head(DRW(LDAMLoss(counts), counts, start_epoch=0, mode='column'), x, y)
    assert (column - plain).abs().max() < 1e-5


@pytest.mark.parametrize('name', list(LOSSES))
def test_every_loss_takes_a_per_class_weight(rng, counts, name):
    z = rng.uniform(-1, 1, (B, C)) if name.startswith('ldam') else rng.normal(0, 3, (B, C))
    y = (rng.random((B, C)) < 0.3).astype(np.float64)
    w = f32_exact(rng, 0.0, 3)
    kw = {'drw_start_epoch': 100} if LOSSES[name].deferred_reweighting else {}
    loss = _build(name, counts, weight=w, reduction='sum', **kw)
    np.testing.assert_allclose(loss(t(z), t(y)).item(), reduce(_reference(name, z, y, counts), w, 'sum'), rtol=2e-6)
    with pytest.raises(ValueError, match='weight'):
        _build(name, counts, weight=[1.0] * 29 + [-1.0], **kw)


def test_make_loss_errors_list_what_is_valid(counts):
    with pytest.raises(ValueError,
                       match="unknown loss 'ce'; valid losses: bce, focal, asl, ldam, ldam_drw, logit_adjusted_bce"):
        make_loss('ce', counts)
    with pytest.raises(TypeError,
                       match=r"loss 'ldam' does not take \['gamma'\]; it takes: max_m, s, weight, reduction"):
        make_loss('ldam', counts, gamma=2)
    with pytest.raises(ValueError, match="loss 'asl' with DRW needs the per-class training counts"):
        make_loss('asl', drw_start_epoch=4)
    with pytest.raises(ValueError, match='needs n_images'):
        make_loss('negative_tolerant_bce', counts)
    with pytest.raises(ValueError, match='needs drw_start_epoch'):
        make_loss('ldam_drw', counts)
    assert make_loss('asl', gamma_neg=2.0, gamma_pos=0.0, clip=0.1, reduction='mean').clip == 0.1
    assert make_loss('ldam', counts, max_m=0.3).margins.max().item() == pytest.approx(0.3)


# ---------------------------------------------------------------- what each loss declares, and the registry
DECLARATIONS = {  # name: (needs_counts, needs_n_images, preferred_head, deferred_reweighting)
    'bce': (False, False, 'linear', False),
    'focal': (False, False, 'linear', False),
    'asl': (False, False, 'linear', False),
    'ldam': (True, False, 'normed', False),
    'ldam_drw': (True, False, 'normed', True),
    'logit_adjusted_bce': (True, True, 'linear', False),
    'negative_tolerant_bce': (True, True, 'linear', False),
    'ldam_as_coded': (True, False, 'linear', False),
    'ldam_drw_as_coded': (True, False, 'linear', True),
}


def test_every_loss_declares_what_it_needs_and_prefers():
    assert list(LOSSES) == list(DECLARATIONS)
    for name, cls in LOSSES.items():
        got = (cls.needs_counts, cls.needs_n_images, cls.preferred_head, cls.deferred_reweighting)
        assert got == DECLARATIONS[name], name
        assert cls.name == name and loss_class(name) is cls and issubclass(cls, MultiLabelLoss)
    assert LOSSES['ldam_drw'] is LDAMDRWLoss and issubclass(LDAMDRWLoss, LDAMLoss)
    with pytest.raises(ValueError, match="unknown loss 'ce'; valid losses: bce, focal, asl, ldam, ldam_drw"):
        loss_class('ce')


def test_make_loss_equals_the_class_built_directly(rng, counts):
    z, y = batch(rng)
    built = make_loss('logit_adjusted_bce', counts, n_images=N_IMAGES, tau=0.5, adjustment='log_prior')
    direct = LogitAdjustedBCE(counts, n_images=N_IMAGES, tau=0.5, adjustment='log_prior')
    assert type(built) is LogitAdjustedBCE and torch.equal(built.adjustments, direct.adjustments)
    assert built(t(z), t(y)).item() == direct(t(z), t(y)).item()
    built = make_loss('negative_tolerant_bce', counts, n_images=N_IMAGES, neg_scale=3.0)
    assert torch.equal(built.bias, NegativeTolerantBCE(counts, N_IMAGES, neg_scale=3.0).bias)
    assert torch.equal(make_loss('ldam', counts, n_images=N_IMAGES).margins, LDAMLoss(counts).margins)
    # counts and n_images go only to the losses that declare them
    assert type(make_loss('asl', counts, n_images=N_IMAGES)) is AsymmetricLoss
    assert make_loss('bce', counts, n_images=N_IMAGES).weight is None


def test_make_loss_names_what_a_loss_needs(counts):
    with pytest.raises(ValueError, match="loss 'logit_adjusted_bce' needs n_images, the number of training images"):
        make_loss('logit_adjusted_bce', counts)
    with pytest.raises(ValueError, match="loss 'negative_tolerant_bce' needs the per-class training counts"):
        make_loss('negative_tolerant_bce', n_images=N_IMAGES)
    with pytest.raises(ValueError, match="loss 'ldam_drw' needs drw_start_epoch"):
        make_loss('ldam_drw', counts)
    with pytest.raises(TypeError, match=r"loss 'logit_adjusted_bce' does not take \['cls_num_list'\]; "
                                        r"it takes: tau, adjustment, weight, reduction"):
        make_loss('logit_adjusted_bce', counts, n_images=N_IMAGES, cls_num_list=counts)


def test_logit_scale_gives_the_probabilities(rng, counts):
    z = rng.normal(0, 1, (B, C))
    ldam = LDAMLoss(counts, s=16)
    assert ldam.logit_scale == 16
    np.testing.assert_allclose(ldam.probabilities(t(z)).double().numpy(), 1 / (1 + np.exp(-16 * z)),
                               rtol=0, atol=1e-6)
    for name in LOSSES:
        loss = _build(name, counts, drw_start_epoch=1)
        k = 30.0 if name in ('ldam', 'ldam_drw') else 1.0   # the as-coded LDAM predicts σ(z), as the paper's code
        assert loss.logit_scale == k, name
        for dtype in (torch.float64, torch.float32, torch.float16):
            zt = t(z, dtype)
            zd = zt.double().numpy()   # the logits as given, exactly
            p, lo = loss.probabilities(zt), loss.log_odds(zt)
            assert p.dtype == lo.dtype == torch.float64, (name, dtype)   # float64, whatever the logits' dtype
            np.testing.assert_array_equal(lo.numpy(), k * zd, err_msg=name)
            np.testing.assert_allclose(p.numpy(), 1 / (1 + np.exp(-k * zd)), rtol=1e-14, atol=0, err_msg=name)


def _spread_cosines(rng, n, lo=0.56, hi=1.0):
    "n float32 cosines spread over (lo, hi): one per cell of an n-cell grid, away from the cell edges, shuffled."
    edges = np.linspace(lo, hi, n + 1)
    z = edges[:-1] + (edges[1] - edges[0]) * rng.uniform(0.25, 0.75, n)
    return rng.permutation(z).astype(np.float32)


def test_confident_ldam_probabilities_do_not_tie(rng):
    "Cosines above 0.555 all give sigmoid(30 z) = 1.0 in float32; in float64 they stay distinct and below 1."
    n, c = 200, 4
    z = np.stack([_spread_cosines(rng, n) for _ in range(c)], 1)                 # float32 cosine logits
    y = (rng.random((n, c)) < (z - 0.56) / 0.44).astype(np.int64)                 # higher cosine, more positives
    loss = LDAMLoss([1, 10, 100, 1000], s=30.0)
    p = loss.probabilities(torch.from_numpy(z)).numpy()
    assert p.dtype == np.float64
    assert all(len(np.unique(p[:, j])) == n for j in range(c)), 'tied probabilities'
    assert np.all(p < 1.0)
    reference = special.expit(30.0 * z.astype(np.float64))                       # float64 sigmoid, in numpy
    np.testing.assert_allclose(p, reference, rtol=1e-15, atol=0)
    from cxrlt.metrics import average_precision_and_auc
    ap = average_precision_and_auc(y, p)[0]                                       # the validation mAP's AP
    ref_ap = np.array([average_precision_score(y[:, j], reference[:, j]) for j in range(c)])
    np.testing.assert_allclose(ap, ref_ap, rtol=1e-12)
    np.testing.assert_allclose([average_precision_score(y[:, j], p[:, j]) for j in range(c)], ref_ap, rtol=1e-12)
    # the float32 path: every probability is exactly 1.0, so AP falls to the prevalence
    p32 = torch.sigmoid(30.0 * torch.from_numpy(z)).numpy()
    assert np.all(p32 == 1.0)
    np.testing.assert_allclose(average_precision_and_auc(y, p32)[0], y.mean(0), rtol=1e-12)
    assert np.all(ref_ap > y.mean(0) + 0.1)


def test_drw_forwards_the_declarations(counts):
    drw = make_loss('ldam_drw', counts, drw_start_epoch=2, s=16)
    assert (drw.logit_scale, drw.preferred_head) == (16.0, 'normed')
    z = torch.tensor([[0.5, -0.25] * (C // 2)])
    assert drw.log_odds(z).dtype == torch.float64 and torch.equal(drw.log_odds(z), 16.0 * z.double())
    assert torch.equal(drw.probabilities(z), torch.sigmoid(16.0 * z.double()))
    assert drw.start_epoch == 2 and drw.mode == 'positive'
    assert drw.extra_repr() == "mode='positive', start_epoch=2, beta=0.9999, epoch=0, active=False"
    drw = make_loss('asl', counts, drw_start_epoch=2, drw_mode='column')
    assert (drw.logit_scale, drw.preferred_head, drw.mode) == (1.0, 'linear', 'column')
    assert DRW_MODES == ('positive', 'column')


def test_registration_checks_names_and_declarations(monkeypatch):
    monkeypatch.setattr(cxrlt.losses, 'LOSSES', dict(LOSSES))
    with pytest.raises(ValueError,
                       match="loss name 'bce' is already registered to cxrlt.losses.BCELoss; give OtherBCE"):
        class OtherBCE(BCELoss, name='bce'): pass
    with pytest.raises(TypeError, match="NoCounts declares needs_counts = True but its constructor takes no 'counts'"):
        class NoCounts(MultiLabelLoss, name='no_counts'): needs_counts = True
    with pytest.raises(ValueError, match="Cosine.preferred_head must be 'linear' or 'normed', got 'cosine'"):
        class Cosine(MultiLabelLoss, name='cosine'): preferred_head = 'cosine'

    class Unregistered(BCELoss): pass
    assert Unregistered.name is None
    assert list(cxrlt.losses.LOSSES) == list(DECLARATIONS)


def test_without_drw_names_the_loss_a_drw_loss_derives_from(monkeypatch):
    expected = {'ldam_drw': 'ldam', 'ldam_drw_as_coded': 'ldam_as_coded'}   # every other registered loss is its own
    for name in DECLARATIONS:
        got = without_drw(name)
        assert got == expected.get(name, name), name
        assert not LOSSES[got].deferred_reweighting and issubclass(LOSSES[name], LOSSES[got]), name
    assert make_loss(without_drw('ldam_drw'), [5, 50]).__class__ is LDAMLoss   # usable without drw_start_epoch
    monkeypatch.setattr(cxrlt.losses, 'LOSSES', dict(LOSSES))
    class FocalDRW(FocalLoss, name='focal_drw'): deferred_reweighting = True
    class Unnamed(FocalDRW): pass              # not registered: skipped
    class FocalDRW2(Unnamed, name='focal_drw2'): pass   # its registered parent focal_drw declares DRW: skipped too
    assert (without_drw('focal_drw'), without_drw('focal_drw2')) == ('focal', 'focal')
    class OnlyDRW(MultiLabelLoss, name='only_drw'): deferred_reweighting = True
    with pytest.raises(ValueError, match="loss 'only_drw' declares deferred_reweighting but no registered loss class "
                                         "it derives from works without it; derive OnlyDRW from a registered loss"):
        without_drw('only_drw')
    with pytest.raises(ValueError, match="unknown loss 'ldam_dwr'; valid losses: bce"):
        without_drw('ldam_dwr')


def test_recipe_add_a_loss(monkeypatch, rng, counts):
    "Recipe: a loss is one class. Subclass MultiLabelLoss with name=, declare what it needs, write _elementwise."
    registry = cxrlt.losses.LOSSES
    monkeypatch.setattr(cxrlt.losses, 'LOSSES', dict(registry))   # a registry of this test only

    class CountWeightedBCE(MultiLabelLoss, name='count_weighted_bce'):
        "BCE whose positive term of class j is weighted by 1/n_j (an example, not a recommendation)."
        needs_counts = True

        def __init__(self, counts, weight=None, reduction='mean'):
            super().__init__(weight, reduction)
            self.register_buffer('pos_weight', torch.tensor(1 / class_counts(counts)))

        def _elementwise(self, x, y):
            return F.binary_cross_entropy_with_logits(x, y, pos_weight=self.pos_weight.to(x.dtype), reduction='none')

    loss = make_loss('count_weighted_bce', counts)
    assert type(loss) is CountWeightedBCE and loss.name == 'count_weighted_bce'
    z, y = batch(rng)
    ref = elementwise(ref_bce, z, y, per_class=lambda j: {'pos_weight': 1 / counts[j]}).mean()
    np.testing.assert_allclose(loss(t(z), t(y)).item(), ref, rtol=1e-10)
    assert 'count_weighted_bce' not in registry


# ---------------------------------------------------------------- numerical safety
@pytest.mark.parametrize('name', list(LOSSES))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_finite_loss_and_gradients_at_extreme_logits(counts, name, dtype):
    z = torch.tensor([[100.0, -100.0] * (C // 2), [-100.0, 100.0] * (C // 2), [0.0] * C], dtype=dtype,
                     requires_grad=True)
    y = torch.tensor([[1.0] * C, [1.0, 0.0] * (C // 2), [0.0] * C])
    kw = {'drw_start_epoch': 0}
    focusing = {'focal': {'gamma': 0.3}, 'asl': {'gamma_neg': 0.3, 'gamma_pos': 0.2}}.get(name, {})
    for extra in ({}, focusing):
        for reduction in ('mean', 'sum', 'none'):
            z.grad = None
            loss = _build(name, counts, reduction=reduction, **kw, **extra)(z, y)
            assert loss.dtype == (torch.float32 if dtype != torch.float64 else dtype)
            loss.sum().backward()
            assert torch.isfinite(loss).all(), (name, dtype, reduction, extra)
            assert torch.isfinite(z.grad.float()).all(), (name, dtype, reduction, extra)


@pytest.mark.parametrize('name', list(LOSSES))
def test_all_zero_label_rows(rng, counts, name):
    z = rng.uniform(-1, 1, (4, C)) if name.startswith('ldam') else rng.normal(0, 3, (4, C))
    y = np.zeros((4, C))
    zt = t(z).requires_grad_(True)
    loss = _build(name, counts, drw_start_epoch=0)(zt, t(y))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zt.grad).all()
    red = _build(name, counts, drw_start_epoch=0).reduction
    # 'positive' (the default) weights only positives: a row without any keeps the unweighted loss
    np.testing.assert_allclose(loss.item(), reduce(_reference(name, z, y, counts), None, red), rtol=2e-6)
    column = _build(name, counts, drw_start_epoch=0, drw_mode='column')(t(z), t(y))
    np.testing.assert_allclose(column.item(), reduce(_reference(name, z, y, counts), ref_cb_weights(counts, 0.9999),
                                                     red), rtol=2e-6)


def test_half_precision_logits_are_computed_in_float32(rng):
    z, y = batch(rng)
    zh = t(z, torch.bfloat16)
    got = AsymmetricLoss()(zh, t(y, torch.float32))
    assert got.dtype == torch.float32
    ref = elementwise(ref_asl, zh.double().numpy(), y).sum()
    assert got.item() == pytest.approx(ref, rel=1e-5)
    # under CPU autocast, a linear head's bf16 output feeds the loss
    head = torch.nn.Linear(8, C)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = head(torch.randn(B, 8))
        assert logits.dtype == torch.bfloat16
        v = make_loss('ldam', np.arange(1, C + 1))(logits, t(y, torch.float32))
    assert v.dtype == torch.float32 and torch.isfinite(v)


def test_bad_shapes_and_reductions_are_named():
    with pytest.raises(ValueError, match=r'same \(batch, classes\) shape, got \(2, 3\) and \(2, 4\)'):
        BCELoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r'got \(3,\) and \(3,\)'):
        FocalLoss()(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match='LDAMLoss: built for 3 classes'):
        LDAMLoss([1, 2, 3])(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        AsymmetricLoss(reduction='batchmean')
    with pytest.raises(TypeError, match='must be torch tensors'):
        BCELoss()(np.zeros((2, 2)), torch.zeros(2, 2))
    with pytest.raises(ValueError, match='clip must lie in'):
        AsymmetricLoss(clip=1.5)


def test_losses_are_modules_whose_buffers_follow_the_model(counts):
    loss = make_loss('ldam_drw', counts, drw_start_epoch=1, weight=np.ones(C))
    names = {n for n, _ in loss.named_buffers()}
    assert names == {'class_weight', 'loss.weight', 'loss.margins'}
    assert all(isinstance(m, MultiLabelLoss) for m in [loss.loss])
    assert loss.to(torch.float64).class_weight.dtype == torch.float64  # .to() moves every buffer


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_losses_on_cuda_match_cpu(rng, counts):
    z, y = batch(rng)
    for name in LOSSES:
        loss = _build(name, counts, drw_start_epoch=0)
        cpu = loss(t(z, torch.float32), t(y, torch.float32))
        gpu = loss.cuda()(t(z, torch.float32).cuda(), t(y, torch.float32).cuda())
        assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4), name
        with torch.autocast('cuda', dtype=torch.bfloat16):
            v = loss(t(z, torch.bfloat16).cuda(), t(y, torch.float32).cuda())
        assert v.dtype == torch.float32 and torch.isfinite(v)
