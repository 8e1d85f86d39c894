"""The server's defences against crafted replies as properties (fedvb.core.robust): what each promises, on
adversarial inputs drawn at random, and that the plain mean stays the algorithms' own average bit for bit."""

import pytest
import torch

from fedvb.core.duality import aggregate
from fedvb.core.gaussian import DENSE, DIAGONAL, ISOTROPIC, Gaussian, NaturalParams, NonPositivePrecisionError
from fedvb.core.robust import MEAN, OUTLIER_FACTOR, Combination, beyond_cohort, clip_to_cohort

CRAFTED = (1e30, -1e30, 1e6, 0.0)


def honest_and_crafted(n: int, f: int, dim: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``n - f`` honest vectors and ``f`` crafted ones (extreme, mixed in sign, or placed inside the range)."""
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(n - f, dim, generator=g, dtype=torch.float64)
    crafted = []
    for i in range(f):
        choice = torch.randint(0, len(CRAFTED) + 1, (dim,), generator=g)
        values = torch.tensor(CRAFTED + (0.0,), dtype=torch.float64)[choice]
        # the last choice: a value just outside the honest range, on a random side
        edge = torch.where(torch.rand(dim, generator=g) < 0.5, honest.min(0).values - 1, honest.max(0).values + 1)
        crafted.append(torch.where(choice == len(CRAFTED), edge, values + i))
    return honest, [*honest, *crafted]


@pytest.mark.parametrize("n,f", [(3, 1), (5, 1), (10, 1), (10, 2), (20, 4)])
@pytest.mark.parametrize("rule", ["trimmed", "median"])
def test_every_coordinate_stays_within_the_honest_range(n, f, rule):
    combination = Combination(rule, trim=0.2)
    if rule == "trimmed":
        assert combination.trimmed_count(n) >= f
    for seed in range(5):
        honest, values = honest_and_crafted(n, f, dim=200, seed=seed)
        weights = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 100 + 1
        for w in (None, weights):
            combined = combination.mean(values, w)
            assert (combined >= honest.min(0).values - 1e-12).all() and (combined <= honest.max(0).values + 1e-12).all()


def test_trimmed_count():
    c = Combination("trimmed", trim=0.1)
    assert [c.trimmed_count(n) for n in (1, 2, 3, 5, 10, 19, 20, 100)] == [0, 0, 1, 1, 1, 1, 2, 10]
    assert Combination("trimmed", trim=0.45).trimmed_count(5) == 2  # never more than (n - 1) // 2


def test_the_plain_mean_is_the_weighted_average_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(7)]
    weights = torch.rand(7, generator=g, dtype=torch.float64) * 10
    stacked = torch.stack(values)
    assert torch.equal(MEAN.mean(values, weights), (weights[:, None] * stacked).sum(0) / weights.sum())
    assert torch.equal(MEAN.mean(values), stacked.mean(0))


def test_robust_rules_agree_with_the_mean_when_the_cohort_agrees():
    same = [torch.full((4,), 2.5, dtype=torch.float64)] * 6
    for rule in ("trimmed", "median"):
        assert torch.allclose(Combination(rule).mean(same, [1, 2, 3, 4, 5, 6]), same[0], rtol=0, atol=1e-15)
    symmetric = [torch.tensor([v], dtype=torch.float64) for v in (-3.0, -1.0, 0.0, 1.0, 3.0)]
    assert float(Combination("trimmed").mean(symmetric)) == 0.0
    assert float(Combination("median").mean(symmetric[:4])) == -0.5  # even n: the middle two averaged


@pytest.mark.parametrize("family", [ISOTROPIC, DIAGONAL])
def test_a_crafted_site_cannot_make_the_server_precision_non_positive(family):
    dim = 6
    prior = Gaussian.isotropic_prior(dim, 1.0, family, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    shape = () if family is ISOTROPIC else (dim,)
    sites = [NaturalParams(torch.randn(dim, generator=g, dtype=torch.float64),
                           torch.rand(shape, generator=g, dtype=torch.float64), family) for _ in range(4)]  # fmt: skip
    crafted = NaturalParams(
        torch.full((dim,), 1e12, dtype=torch.float64), torch.full(shape, -1e3, dtype=torch.float64), family
    )
    with pytest.raises(NonPositivePrecisionError):
        aggregate(prior, [], [*sites, crafted], alpha=1.0)
    robust = aggregate(prior, [], [*sites, crafted], alpha=1.0, combination=Combination("trimmed"))
    assert bool((robust.precision > 0).all())
    honest_total = torch.stack([s.linear for s in sites])
    # the linear part of the site sum: n times a value within the honest range, so bounded by the honest sites
    linear = robust.natural().linear - prior.natural().linear
    assert bool((linear.abs() <= 5 * honest_total.abs().max(0).values + 1e-9).all())


def test_a_dense_precision_combined_entrywise_that_is_not_positive_definite_is_an_error_not_a_crash():
    prior = Gaussian.isotropic_prior(2, 1.0, DENSE, dtype=torch.float64)
    # three honest sites whose entrywise median is indefinite: diag 1, off-diagonal 2
    sites = [NaturalParams(torch.zeros(2, dtype=torch.float64), torch.tensor(q, dtype=torch.float64), DENSE)
             for q in ([[1.0, 2.0], [2.0, 4.0]], [[4.0, 2.0], [2.0, 1.0]], [[1.0, -1.0], [-1.0, 1.0]])]  # fmt: skip
    # prior + 3 x [[1, 2], [2, 1]] = [[4, 6], [6, 4]]: eigenvalues -2 and 10
    with pytest.raises(NonPositivePrecisionError):
        aggregate(prior, [], sites, alpha=1.0, combination=Combination("median"))
    assert bool((torch.linalg.eigvalsh(aggregate(prior, [], sites, alpha=1.0).precision) > 0).all())


def test_clip_bounds_every_change_by_the_cohorts_median():
    g = torch.Generator().manual_seed(3)
    changes = [torch.randn(30, generator=g, dtype=torch.float64) for _ in range(6)]
    changes.append(torch.full((30,), 1e9, dtype=torch.float64))
    sizes = [100.0] * 6 + [100.0]
    clipped = clip_to_cohort(changes, sizes, factor=3.0)
    median = torch.stack([c.norm() for c in changes]).median()
    assert all(float(c.norm()) <= 3.0 * float(median) * (1 + 1e-12) for c in clipped)
    assert all(a is b for a, b in zip(clipped[:6], changes[:6]) if float(b.norm()) <= 3 * float(median))
    assert torch.allclose(clipped[-1] / clipped[-1].norm(), changes[-1] / changes[-1].norm())  # direction kept
    assert clip_to_cohort(changes[:2], sizes[:2], 3.0) == changes[:2]  # fewer than 3: no majority, no clip


def test_bad_combinations_are_refused_by_name():
    with pytest.raises(ValueError, match="combine: unknown 'average'"):
        Combination("average")
    with pytest.raises(ValueError, match="combine_trim"):
        Combination("trimmed", trim=0.5)


def test_an_outlier_is_a_change_beyond_the_factor_times_its_allowance():
    assert OUTLIER_FACTOR == 1000.0
    sizes = [10, 10, 10, 10, 10]
    assert beyond_cohort([1, 2, 2, 3, 2001], sizes) == [False] * 4 + [True]  # median 2: allowance 2000
    assert beyond_cohort([1, 2, 2, 3, 1999], sizes) == [False] * 5
    # a client with twice the median's examples may move twice as far before it counts
    assert beyond_cohort([1, 2, 2, 3, 3999], [10, 10, 10, 10, 20]) == [False] * 5
    assert beyond_cohort([0, 1e30], [1, 1]) == [False, False]  # no honest majority to anchor a median
