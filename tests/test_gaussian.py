"""Each family's algebra against dense reference computations."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from fedvb.core.gaussian import (
    DENSE,
    DIAGONAL,
    FAMILIES,
    ISOTROPIC,
    Gaussian,
    NaturalParams,
    NonPositivePrecisionError,
    family_by_name,
)

DIM = 5
FAMILY_LIST = list(FAMILIES.values())
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def random_precision(family, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if family is ISOTROPIC:
        return torch.tensor(0.5 + torch.rand((), generator=g).item() * 3, dtype=dtype)
    if family is DIAGONAL:
        return (0.3 + 3 * torch.rand(DIM, generator=g)).to(dtype)
    a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    return (a @ a.T + 0.5 * torch.eye(DIM, dtype=torch.float64)).to(dtype)


def random_gaussian(family, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    mean = torch.randn(DIM, generator=g, dtype=torch.float64).to(dtype)
    return Gaussian(mean, random_precision(family, dtype, seed), family)


def reference(q: Gaussian) -> MultivariateNormal:
    return MultivariateNormal(q.mean.double(), precision_matrix=q.dense_precision().double())


@pytest.mark.parametrize("family", FAMILY_LIST, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_natural_round_trip(family, dtype):
    q = random_gaussian(family, dtype)
    nat = q.natural()
    dense_linear = q.dense_precision() @ q.mean
    torch.testing.assert_close(nat.linear, dense_linear, rtol=TOL[dtype], atol=TOL[dtype])
    back = Gaussian.from_natural(nat)
    torch.testing.assert_close(back.mean, q.mean, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(back.precision, q.precision)
    assert back.mean.dtype == dtype


@pytest.mark.parametrize("family", FAMILY_LIST, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kl_and_log_prob_match_dense_reference(family, dtype):
    q, p = random_gaussian(family, dtype, seed=1), random_gaussian(family, dtype, seed=2)
    expected_kl = kl_divergence(reference(q), reference(p)).item()
    assert q.kl(p).item() == pytest.approx(expected_kl, rel=10 * TOL[dtype])
    assert q.kl(q).item() == pytest.approx(0.0, abs=10 * TOL[dtype])
    x = torch.randn(7, DIM, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(
        q.log_prob(x).double(), reference(q).log_prob(x.double()), rtol=10 * TOL[dtype], atol=10 * TOL[dtype]
    )


@pytest.mark.parametrize("family", FAMILY_LIST, ids=lambda f: f.name)
def test_sampling_moments(family):
    q = random_gaussian(family, torch.float64, seed=3)
    n = 200_000
    draws = q.sample(n, torch.Generator().manual_seed(0))
    assert draws.shape == (n, DIM)
    cov = q.covariance()
    # Standard error of the mean is sqrt(var / n); allow 5 of them.
    se = (torch.diagonal(cov) / n).sqrt()
    assert ((draws.mean(0) - q.mean).abs() <= 5 * se).all()
    empirical = torch.cov(draws.T)
    assert torch.allclose(empirical, cov, atol=0.02 * cov.abs().max().item())
    # The generator makes sampling reproducible.
    again = q.sample(n, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("family", FAMILY_LIST, ids=lambda f: f.name)
def test_variance_second_moment_and_expectation_against_dense(family):
    q = random_gaussian(family, seed=4)
    cov = q.covariance()
    torch.testing.assert_close(q.variance(), torch.diagonal(cov))
    second = cov + torch.outer(q.mean, q.mean)
    expected = {
        "dense": second,
        "diagonal": torch.diagonal(second),
        "isotropic": torch.trace(second),
    }[family.name]
    torch.testing.assert_close(family.second_moment(q.mean, q.precision), expected)
    expectation = q.expectation()
    torch.testing.assert_close(expectation.linear, q.mean)
    torch.testing.assert_close(expectation.quadratic, -0.5 * expected)


def test_project_is_the_mean_field_optimum():
    a = random_precision(DENSE, torch.float64, 5)
    torch.testing.assert_close(DENSE.project(a), a)
    torch.testing.assert_close(DIAGONAL.project(a), torch.diagonal(a))
    assert ISOTROPIC.project(a).item() == pytest.approx(torch.trace(a).item() / DIM)


@pytest.mark.parametrize("family", FAMILY_LIST, ids=lambda f: f.name)
def test_natural_arithmetic(family):
    a, b = random_gaussian(family, seed=6).natural(), random_gaussian(family, seed=7).natural()
    total = a + b
    torch.testing.assert_close(total.linear, a.linear + b.linear)
    torch.testing.assert_close((total - b).quadratic, a.quadratic)
    torch.testing.assert_close((2.0 * a).linear, (a + a).linear)
    torch.testing.assert_close((a * 0.5).quadratic, (a / 2).quadratic)
    torch.testing.assert_close((-a).linear, -a.linear)
    zero = NaturalParams.zeros(DIM, family)
    assert torch.equal((a + zero).quadratic, a.quadratic)


def test_combining_different_families_is_an_error():
    with pytest.raises(ValueError, match="cannot combine diagonal"):
        random_gaussian(DIAGONAL).natural() + random_gaussian(DENSE).natural()


@pytest.mark.parametrize(
    "family, precision, message",
    [
        (ISOTROPIC, torch.tensor(-1.0, dtype=torch.float64), "isotropic precision -1 <= 0"),
        (ISOTROPIC, torch.tensor(float("nan"), dtype=torch.float64), "not finite"),
        (DIAGONAL, torch.tensor([1.0, 2.0, 0.0, 1.0, -3.0], dtype=torch.float64), "2 of 5 entries <= 0"),
        (DENSE, torch.diag(torch.tensor([1.0, 2.0, -0.5, 1.0, 1.0], dtype=torch.float64)), "not positive definite"),
    ],
    ids=["iso-negative", "iso-nan", "diag-nonpositive", "dense-indefinite"],
)
def test_positivity_errors(family, precision, message):
    mean = torch.zeros(DIM, dtype=torch.float64)
    with pytest.raises(NonPositivePrecisionError, match=message):
        Gaussian(mean, precision, family)
    with pytest.raises(NonPositivePrecisionError, match=message):
        Gaussian.from_natural(NaturalParams(mean, precision, family))


def test_an_update_that_breaks_positivity_raises_with_context():
    q = random_gaussian(DENSE, seed=8)
    too_big = NaturalParams(torch.zeros(DIM, dtype=torch.float64), 2 * q.precision, DENSE)
    with pytest.raises(NonPositivePrecisionError, match="server posterior: dense precision"):
        Gaussian.from_natural(q.natural() - too_big, what="server posterior")


def test_shape_errors_name_the_expected_layout():
    with pytest.raises(ValueError, match=r"diagonal precision for P=5 has shape \(5,\)"):
        Gaussian(torch.zeros(DIM), torch.ones(4), DIAGONAL)


@pytest.mark.parametrize("family", FAMILY_LIST, ids=lambda f: f.name)
def test_clamp_raises_small_eigenvalues_only(family):
    q = random_gaussian(family, seed=9)
    eigen = torch.linalg.eigvalsh(q.dense_precision())
    floor = float(eigen.mean())
    clamped = q.clamped(floor)
    new_eigen = torch.linalg.eigvalsh(clamped.dense_precision())
    assert new_eigen.min() >= floor * (1 - 1e-12)
    torch.testing.assert_close(new_eigen, eigen.clamp(min=floor))


def test_isotropic_prior_in_each_family_is_the_same_distribution():
    priors = [Gaussian.isotropic_prior(DIM, 2.5, f) for f in FAMILY_LIST]
    for q in priors:
        torch.testing.assert_close(q.dense_precision(), 2.5 * torch.eye(DIM, dtype=torch.float64))
        assert q.log_prob(torch.zeros(DIM, dtype=torch.float64)).item() == pytest.approx(
            0.5 * DIM * math.log(2.5 / (2 * math.pi))
        )


def test_family_by_name_lists_allowed_names():
    assert family_by_name("dense") is DENSE
    with pytest.raises(ValueError, match="allowed: isotropic, diagonal, dense"):
        family_by_name("kron")
