"cxrlt.samplers: long-tail samplers, label statistics and the class-frequency figure."
import matplotlib
matplotlib.use('Agg')
import numpy as np
import pandas as pd
import pytest
import torch

from cxrlt.labels import CLASSES
from cxrlt.samplers import (ClassAwareSampler, ClassPowerSampler, InstanceBalancedSampler, RepeatFactorSampler,
                            SquareRootSampler, cooccurrence, imbalance_ratio, label_statistics, plot_class_frequencies,
                            sampled_class_share)


# ---------------------------------------------------------------- samplers

def multilabel(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    prev = np.array([0.5, 0.3, 0.1, 0.03, 0.01, 0.003])
    y = (rng.random((n, len(prev))) < prev).astype(np.int8)
    y[:2, 5] = 1                                    # at least 2 positives everywhere
    y[:, 4] = 0; y[[7, 8, 9]] = 0; y[[7, 8, 9], 4] = 1     # class 4: three images that carry nothing else
    return y


def assert_share(got, expected, draws):
    "Empirical shares within 5 standard errors of the expected ones."
    expected = np.asarray(expected, float)
    se = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(np.asarray(got) - expected) <= 5 * se + 1e-12), (got, expected)


def test_instance_balanced_sampler():
    y = multilabel()
    s = InstanceBalancedSampler(y)
    idx = list(s)
    assert sorted(idx) == list(range(len(y)))
    np.testing.assert_allclose(sampled_class_share(y, idx), y.sum(0) / len(y))
    s2 = InstanceBalancedSampler(y, num_samples=2 * len(y) + 5)
    assert np.bincount(list(s2), minlength=len(y)).min() >= 2


@pytest.mark.parametrize('make, power', [(ClassAwareSampler, 0.0), (SquareRootSampler, 0.5),
                                         (lambda y, **kw: ClassPowerSampler(y, power=1.0, **kw), 1.0)])
def test_class_power_samplers_give_their_class_distribution(make, power):
    y = multilabel().astype(np.float64)
    n_c = y.sum(0)
    p = n_c ** power / (n_c ** power).sum()              # probability of drawing each class (Kang et al. 2020)
    draws = 200_000
    s = make(y, num_samples=draws, seed=7)
    np.testing.assert_allclose(s.class_probabilities, p, rtol=1e-12)
    idx = np.array(list(s))
    # a draw carries class d when the drawn class c's image has d: sum_c p_c * |c and d| / |c|
    co = y.T @ y
    expected = (p[:, None] * co / n_c[:, None]).sum(0)
    assert_share(y[idx].mean(0), expected, draws)
    # images 7, 8, 9 carry only class 4, so each is drawn with probability p_4 / 3
    counts = np.bincount(idx, minlength=10)[7:10]
    m = draws * p[4] / 3
    assert np.all(np.abs(counts - m) <= 5 * np.sqrt(m)), (counts, m)


def test_class_aware_on_single_label_is_uniform():
    y = np.repeat(np.eye(4, dtype=int), [5000, 500, 50, 5], axis=0)
    draws = 100_000
    share = sampled_class_share(y, ClassAwareSampler(y, num_samples=draws, seed=1))
    assert_share(share, [0.25] * 4, draws)
    y0 = np.concatenate([y, np.zeros((len(y), 1), int)], axis=1)
    s = ClassAwareSampler(y0, num_samples=1000)
    assert s.class_probabilities[-1] == 0 and np.isclose(s.class_probabilities[:4], 0.25).all()


def test_repeat_factor_sampler():
    y = multilabel()
    t = 0.05
    f = y.mean(0)
    r_c = np.maximum(1, np.sqrt(t / f))                   # Gupta et al. 2019, eq. for r(c)
    r_i = np.array([max([r_c[c] for c in np.flatnonzero(row)], default=1.0) for row in y])
    s = RepeatFactorSampler(y, threshold=t, seed=2)
    np.testing.assert_allclose(s.repeat_factors, r_i, rtol=1e-12)
    assert len(s) == round(r_i.sum())
    epochs = 60
    counts = np.zeros(len(y))
    for e in range(epochs):
        s.set_epoch(e)
        counts += np.bincount(list(s), minlength=len(y))
    # the rare class (3 images) is repeated r ≈ sqrt(t / f) times per epoch
    np.testing.assert_allclose(counts[[7, 8, 9]].mean() / epochs, r_i[[7, 8, 9]].mean(), rtol=0.15)
    expected = (y * r_i[:, None]).sum(0) / r_i.sum()
    got = (y * counts[:, None]).sum(0) / counts.sum()
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=1e-3)


def test_samplers_are_seeded_sharded_and_feed_a_dataloader():
    y = torch.tensor(multilabel(500))
    for cls in (InstanceBalancedSampler, ClassAwareSampler, SquareRootSampler, RepeatFactorSampler):
        a, b = cls(y, seed=4), cls(y, seed=4)
        first = list(a)
        assert list(b) == first                     # same seed, same epoch
        assert list(a) != first                     # the next pass is the next epoch
        a.set_epoch(0)
        assert list(a) == first
        assert list(cls(y, seed=5)) != first
        shards = [cls(y, num_samples=101, seed=4, num_replicas=3, rank=k) for k in range(3)]
        parts = [list(x) for x in shards]
        assert [len(p) for p in parts] == [34, 34, 34]
        full = cls(y, num_samples=102, seed=4)
        assert sorted(sum(parts, [])) == sorted(list(full))
        assert len(cls(y, num_samples=101, seed=4)) == 101
    ds = torch.utils.data.TensorDataset(torch.arange(len(y)), y)
    dl = torch.utils.data.DataLoader(ds, batch_size=64, sampler=ClassAwareSampler(y, seed=0))
    batches = list(dl)
    assert sum(len(b[0]) for b in batches) == len(y)
    with pytest.raises(ValueError, match='rank must lie in'): ClassAwareSampler(y, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match='num_samples must be a positive integer'): ClassAwareSampler(y, num_samples=0)


# ---------------------------------------------------------------- label statistics

def test_label_statistics_against_hand_computation():
    y = multilabel(2000, seed=3)
    df = pd.DataFrame(y, columns=[f'c{i}' for i in range(y.shape[1])])
    st = label_statistics(df, head_min=0.2, tail_max=0.02)
    pos = y.sum(0).astype(np.float64)
    np.testing.assert_array_equal(st['positives'].to_numpy(), pos)
    np.testing.assert_allclose(st['share'].to_numpy(), pos / 2000)
    np.testing.assert_allclose(st['negatives_per_positive'].to_numpy(), (2000 - pos) / pos)
    assert st['group'].tolist() == ['head' if p / 2000 >= 0.2 else 'tail' if p / 2000 < 0.02 else 'medium' for p in pos]
    assert imbalance_ratio(y) == pos.max() / pos[pos > 0].min()
    co = cooccurrence(df)
    ref = np.array([[int(np.sum(y[:, i] & y[:, j])) for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(co.to_numpy(), ref)
    cond = cooccurrence(df, normalize='conditional').to_numpy()
    np.testing.assert_allclose(cond[0, 1], np.sum(y[:, 0] & y[:, 1]) / y[:, 0].sum())
    full = pd.DataFrame(np.zeros((10, 30), np.int8), columns=CLASSES).assign(ImageID='x')
    full.loc[:2, 'Hernia'] = 1
    assert label_statistics(full).loc['Hernia', 'positives'] == 3 and label_statistics(full).index.tolist() == CLASSES
    with pytest.raises(ValueError, match="label column 'c0' must hold only 0 and 1"):
        label_statistics(df.replace({1: 2}))


def test_class_frequency_figure():
    y = multilabel(2000, seed=3)
    y = np.concatenate([y, np.zeros((len(y), 24), int)], axis=1)
    ax = plot_class_frequencies(y)
    assert ax.get_xscale() == 'log'
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == sorted(y.sum(0).tolist())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == 'Normal' and 'calcified densities (none)' in labels
    colours = {tuple(np.round(p.get_facecolor(), 3)) for p in ax.patches if p.get_width() > 0}
    assert len(colours) == 3   # head, medium and tail
