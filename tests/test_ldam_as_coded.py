"""`ldam_as_coded` / `ldam_drw_as_coded`, LDAM as the paper's public code applies it (sigmoid BCE on s·(z − Δ_j y)
over a plain linear head, s = 30, predictions σ(z)), against the formula computed by hand in float64 numpy:
Cao et al. 2019's margins Δ_j = K / n_j^(1/4), the loss, its gradient, and DRW's positive-term weights
(Cui et al. 2019's class-balanced β rule)."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special

from cxrlt.labels import CLASSES
from cxrlt.losses import (DRW, LOSSES, LDAMAsCodedLoss, LDAMDRWAsCodedLoss, LDAMLoss, loss_class, make_loss,
                          without_drw)

B, C = 8, 30


# ---------------------------------------------------------------- float64 references, by hand
def ref_margins(n, max_m=0.5):
    "Cao et al. 2019: Δ_j = K / n_j^(1/4), K chosen so that the rarest class (the largest margin) gets max_m."
    n = np.asarray(n, np.float64)
    K = max_m * n.min() ** 0.25
    return K / n ** 0.25


def ref_cb_weights(n, beta=0.9999):
    "Cui et al. 2019: (1 − β) / (1 − β^n_j), normalised to sum to the number of classes."
    n = np.asarray(n, np.float64)
    w = (1 - beta) / (1 - beta ** n)
    return w * n.size / w.sum()


def ref_scaled_logits(z, y, margins, s=30.0):
    "The loss's logits s·(z − Δ_j y): the margin on positives only."
    return s * (z - margins[None, :] * y)


def ref_elementwise(z, y, margins, s=30.0):
    "BCE with logits x = s·(z − Δ_j y): log(1 + e^x) − y·x."
    x = ref_scaled_logits(z, y, margins, s)
    return np.logaddexp(0.0, x) - y * x


def ref_element_weights(y, own=None, cb=None):
    "own_j on every element; with DRW active, × cb_j on a positive and × 1 on a negative."
    w = np.ones_like(y) if own is None else np.broadcast_to(np.asarray(own, np.float64)[None, :], y.shape).copy()
    if cb is not None: w = w * np.where(y == 1, np.asarray(cb)[None, :], 1.0)
    return w


def ref_loss_and_grad(z, y, margins, s=30.0, own=None, cb=None, reduction='mean'):
    "The reduced loss and its gradient d loss / d z: W·s·(σ(x) − y), divided by B·C for the mean."
    W = ref_element_weights(y, own, cb)
    e = W * ref_elementwise(z, y, margins, s)
    g = W * s * (special.expit(ref_scaled_logits(z, y, margins, s)) - y)
    if reduction == 'mean': return e.mean(), g / e.size
    if reduction == 'sum': return e.sum(), g
    return e, None


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def rng():
    return np.random.default_rng(16)


@pytest.fixture
def counts(rng):
    "Long-tailed per-class counts, from tens of thousands down to a few."
    return np.sort(np.round(rng.lognormal(6, 2, C)).clip(2, 30_000))[::-1].copy()


def linear_batch(rng, rows=B):
    "Logits of a plain linear head (not bounded by 1) and 0/1 labels; row 0 has no positive label."
    z = rng.normal(0, 0.4, (rows, C))
    y = (rng.random((rows, C)) < 0.3).astype(np.float64)
    y[0] = 0
    return z, y


def f32_exact(rng, lo, hi, n=C):
    "Per-class weights exactly representable in float32 (the losses keep their buffers in float32)."
    return rng.uniform(lo, hi, n).astype(np.float32).astype(np.float64)


def loss_and_grad(loss, z, y, dtype=torch.float64):
    zt = torch.tensor(z, dtype=dtype, requires_grad=True)
    v = loss(zt, torch.tensor(y, dtype=dtype))
    v.backward()
    return v.detach().double().numpy(), zt.grad.double().numpy()


# ---------------------------------------------------------------- margins
@pytest.mark.parametrize('max_m', [0.5, 0.3, 1.0])
def test_margins_are_cao_et_al(counts, max_m):
    m = LDAMAsCodedLoss(counts, max_m=max_m).margins.double().numpy()
    np.testing.assert_allclose(m, ref_margins(counts, max_m), rtol=1e-7)     # float32 buffer
    assert m[np.argmin(counts)] == pytest.approx(max_m, rel=1e-7)           # the rarest class gets max_m
    i, j = np.argmin(counts), np.argmax(counts)
    assert m[i] / m[j] == pytest.approx((counts[j] / counts[i]) ** 0.25, rel=1e-6)


def test_margins_from_a_series_follow_the_class_order():
    n = pd.Series({c: float(k + 1) ** 2 for k, c in enumerate(CLASSES)})[::-1]   # given in reverse order
    m = LDAMAsCodedLoss(n).margins.double().numpy()
    np.testing.assert_allclose(m, ref_margins(np.arange(1, C + 1, dtype=np.float64) ** 2), rtol=1e-7)


# ---------------------------------------------------------------- the loss and its gradient
@pytest.mark.parametrize('s', [30.0, 10.0])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_loss_matches_the_float64_formula(rng, counts, s, reduction):
    z, y = linear_batch(rng)
    loss = LDAMAsCodedLoss(counts, s=s, reduction=reduction)
    want, _ = ref_loss_and_grad(z, y, ref_margins(counts), s, reduction=reduction)
    got = loss(torch.tensor(z), torch.tensor(y)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * s)   # margins are kept in float32


@pytest.mark.parametrize('dtype,rtol', [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_gradient_matches_the_hand_formula(rng, counts, dtype, rtol):
    z, y = linear_batch(rng)
    own = f32_exact(rng, 0.5, 2.0)
    for weight in (None, own):
        loss = LDAMAsCodedLoss(counts, weight=weight)
        got_v, got_g = loss_and_grad(loss, z, y, dtype)
        want_v, want_g = ref_loss_and_grad(z, y, ref_margins(counts), own=weight)
        np.testing.assert_allclose(got_v, want_v, rtol=rtol)
        np.testing.assert_allclose(got_g, want_g, rtol=rtol, atol=rtol * np.abs(want_g).max())


@pytest.mark.parametrize('own', [False, True])
def test_drw_off_then_on_matches_the_hand_formula(rng, counts, own):
    "Through make_loss: before start_epoch the element weights are own_j; from it on own_j·cb_j on positives only."
    z, y = linear_batch(rng)
    w_own = f32_exact(rng, 0.5, 2.0) if own else None
    loss = make_loss('ldam_drw_as_coded', counts, drw_start_epoch=2, drw_beta=0.999,
                     **({'weight': w_own} if own else {}))
    cb, margins = ref_cb_weights(counts, 0.999), ref_margins(counts)
    assert np.ptp(ref_element_weights(y, w_own, cb)[1:], axis=0).max() > 1   # weights differ within a column
    for epoch, active in [(0, False), (1, False), (2, True), (5, True)]:
        loss.set_epoch(epoch)
        assert loss.active == active
        got_v, got_g = loss_and_grad(loss, z, y)
        want_v, want_g = ref_loss_and_grad(z, y, margins, own=w_own, cb=cb if active else None)
        np.testing.assert_allclose(got_v, want_v, rtol=2e-6, err_msg=f'epoch {epoch}')
        np.testing.assert_allclose(got_g, want_g, rtol=2e-6, atol=2e-6 * np.abs(want_g).max(), err_msg=f'epoch {epoch}')
    # the active loss is not the inactive one: DRW changes something
    off, _ = ref_loss_and_grad(z, y, margins, own=w_own)
    assert abs(loss(torch.tensor(z), torch.tensor(y)).item() - off) > 1e-3 * off


def test_drw_per_element_weights_with_reduction_none(rng, counts):
    z, y = linear_batch(rng)
    loss = make_loss('ldam_drw_as_coded', counts, drw_start_epoch=0, reduction='none')
    want, _ = ref_loss_and_grad(z, y, ref_margins(counts), cb=ref_cb_weights(counts), reduction='none')
    np.testing.assert_allclose(loss(torch.tensor(z), torch.tensor(y)).numpy(), want, rtol=2e-6, atol=1e-9)


# ---------------------------------------------------------------- the margin moves positives only
def test_only_positives_get_the_margin(rng, counts):
    z = rng.normal(0, 0.4, (B, C))
    loss = LDAMAsCodedLoss(counts, reduction='none')
    other = LDAMAsCodedLoss(counts[::-1].copy(), reduction='none')   # other margins per class
    zt = torch.tensor(z)
    neg = loss(zt, torch.zeros_like(zt)).numpy()
    # atol: torch's BCE takes log(1 + e^-|x|), not log1p, so a loss near 0 carries an absolute error of ~1e-16
    np.testing.assert_allclose(neg, np.logaddexp(0.0, 30 * z), rtol=1e-12, atol=1e-14)   # BCE(s z, 0): no margin
    np.testing.assert_array_equal(neg, other(zt, torch.zeros_like(zt)).numpy())
    pos = loss(zt, torch.ones_like(zt)).numpy()
    np.testing.assert_allclose(pos, np.logaddexp(0.0, -30 * (z - ref_margins(counts))), rtol=1e-6, atol=1e-14)
    assert np.all(pos > np.logaddexp(0.0, -30 * z))   # the margin makes every positive cost more
    assert not np.allclose(pos, other(zt, torch.ones_like(zt)).numpy())


# ---------------------------------------------------------------- by name, and what it predicts
def test_registered_names_through_make_loss(counts):
    assert loss_class('ldam_as_coded') is LDAMAsCodedLoss and LOSSES['ldam_drw_as_coded'] is LDAMDRWAsCodedLoss
    plain = make_loss('ldam_as_coded', counts, n_images=100_000)
    assert type(plain) is LDAMAsCodedLoss and (plain.s, plain.max_m) == (30.0, 0.5)
    np.testing.assert_allclose(plain.margins.double().numpy(), ref_margins(counts), rtol=1e-7)
    tuned = make_loss('ldam_as_coded', counts, max_m=0.3, s=16)
    np.testing.assert_allclose(tuned.margins.double().numpy(), ref_margins(counts, 0.3), rtol=1e-7)
    drw = make_loss('ldam_drw_as_coded', counts, drw_start_epoch=12)
    assert type(drw) is DRW and type(drw.loss) is LDAMDRWAsCodedLoss
    assert (drw.start_epoch, drw.mode, drw.preferred_head, drw.logit_scale) == (12, 'positive', 'linear', 1.0)
    np.testing.assert_allclose(drw.class_weight.double().numpy(), ref_cb_weights(counts), rtol=1e-6)
    for cls in (LDAMAsCodedLoss, LDAMDRWAsCodedLoss):
        assert (cls.needs_counts, cls.needs_n_images, cls.preferred_head) == (True, False, 'linear')
    assert (LDAMAsCodedLoss.deferred_reweighting, LDAMDRWAsCodedLoss.deferred_reweighting) == (False, True)
    assert without_drw('ldam_drw_as_coded') == 'ldam_as_coded'
    with pytest.raises(ValueError, match="loss 'ldam_drw_as_coded' needs drw_start_epoch"):
        make_loss('ldam_drw_as_coded', counts)
    with pytest.raises(ValueError, match="loss 'ldam_as_coded' needs the per-class training counts"):
        make_loss('ldam_as_coded')
    with pytest.raises(TypeError, match=r"does not take \['gamma'\]; it takes: max_m, s, weight, reduction"):
        make_loss('ldam_as_coded', counts, gamma=2)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.float16])
def test_predictions_are_the_sigmoid_of_the_raw_logits(rng, counts, dtype):
    "The paper's code predicts σ(z) of its linear head: log-odds z (k = 1), not s·z as LDAM on a cosine head."
    z = rng.normal(0, 3, (B, C))
    zt = torch.tensor(z, dtype=dtype)
    z_given = zt.double().numpy()
    for loss in (LDAMAsCodedLoss(counts), make_loss('ldam_drw_as_coded', counts, drw_start_epoch=0)):
        lo, p = loss.log_odds(zt), loss.probabilities(zt)
        assert lo.dtype == p.dtype == torch.float64 and loss.logit_scale == 1.0
        np.testing.assert_array_equal(lo.numpy(), z_given)
        np.testing.assert_allclose(p.numpy(), special.expit(z_given), rtol=1e-14, atol=0)
    cosine = LDAMLoss(counts).probabilities(zt).numpy()          # σ(30 z): another number, the same decision at 0.5
    assert not np.allclose(cosine, special.expit(z_given))
    np.testing.assert_array_equal(cosine > 0.5, special.expit(z_given) > 0.5)


def test_the_trainer_reports_sigmoid_of_the_raw_logits(rng, counts):
    from cxrlt.train import _log_odds, _probabilities
    z = rng.normal(0, 2, (B, C)).astype(np.float32)
    loss = make_loss('ldam_drw_as_coded', counts, drw_start_epoch=1)
    np.testing.assert_array_equal(_log_odds(loss, z), z.astype(np.float64))
    np.testing.assert_allclose(_probabilities(loss, z), special.expit(z.astype(np.float64)), rtol=1e-14, atol=0)


def test_soft_targets_are_refused_naming_the_loss(counts):
    y = torch.zeros(2, C); y[1, 3] = 0.5
    with pytest.raises(ValueError, match=r"^LDAMAsCodedLoss: target 0.5 at row 1, class 3 \('pleural effusion'\)"):
        LDAMAsCodedLoss(counts)(torch.zeros(2, C), y)
