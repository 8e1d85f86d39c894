"""The native IVON kernels: the draw is standard normal and keyed, the update equals the torch update."""

import os

import numpy as np
import pytest
import torch
from scipy import stats

from fedvb.core import ivon_native
from fedvb.core.ivon import ivon_update_

KERNELS = ivon_native.load()
pytestmark = pytest.mark.skipif(
    KERNELS is None and os.environ.get("CI") != "true", reason="no C compiler for the native IVON kernels"
)


def draw(n: int, key: int, sqrt_precision: torch.Tensor | None = None):
    param = torch.linspace(-1, 1, n)
    saved, noise = torch.empty(n), torch.empty(n)
    sqrt_precision = torch.ones(n) if sqrt_precision is None else sqrt_precision
    before = param.clone()
    KERNELS.sample_(param, saved, noise, sqrt_precision, key)
    return before, param, saved, noise


def test_the_draw_is_standard_normal():
    _, _, _, z = draw(2_000_001, key=2**40 + 17)  # odd length: the middle element uses half a pair
    z = z.double().numpy()
    assert abs(z.mean()) < 3e-3 and abs(z.var() - 1) < 3e-3
    assert abs(stats.skew(z)) < 1e-2 and abs(stats.kurtosis(z)) < 2e-2
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert np.abs(z).max() < 6.0  # 24-bit uniforms: |z| <= sqrt(2 ln 2^24) = 5.77
    for lo, hi in ((-1, 1), (1, 2), (2, 3)):  # tail masses
        assert np.mean((np.abs(z) > lo) & (np.abs(z) <= hi)) == pytest.approx(
            2 * (stats.norm.cdf(hi) - stats.norm.cdf(lo)) if lo >= 0 else stats.norm.cdf(1) - stats.norm.cdf(-1),
            abs=2e-3,
        )


def test_draws_are_independent_across_elements_pairs_and_keys():
    n = 400_000
    z = draw(n, key=5)[3].double()
    other = draw(n, key=6)[3].double()
    half = n // 2
    for a, b in ((z[:-1], z[1:]), (z[:half], z[half:]), (z[:half] ** 2, z[half:] ** 2), (z, other)):
        assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 1e-2


def test_the_draw_is_a_function_of_the_key_and_moves_the_weights_by_z_over_sqrt_precision():
    sqrt_precision = torch.linspace(0.5, 3.0, 1001)
    before, param, saved, z = draw(1001, key=99, sqrt_precision=sqrt_precision)
    assert torch.equal(saved, before)
    assert torch.equal(param, before + z / sqrt_precision)
    assert torch.equal(draw(1001, key=99)[3], z) and not torch.equal(draw(1001, key=100)[3], z)


@pytest.mark.parametrize("prior", ["isotropic", "per-parameter"])
@pytest.mark.parametrize("terms", ["none", "all", "mean-only"])
@pytest.mark.parametrize("raw_noise", [True, False])
@pytest.mark.parametrize("clip", [float("inf"), 1e-3])
def test_the_fused_update_equals_the_torch_update(prior, terms, raw_noise, clip):
    g = torch.Generator().manual_seed(0)
    n = 5003

    def rand(scale=1.0, positive=False):
        x = torch.randn(n, generator=g) * scale
        return x.abs() + 0.1 if positive else x

    mean, hess, momentum, grad, noise = rand(), rand(0.5, True), rand(0.1), rand(), rand()
    s0 = torch.tensor(2.0) if prior == "isotropic" else rand(3.0, True)
    s0m0 = rand() if terms != "none" else None
    dual_v, dual_big_v = (rand(), rand(0.05)) if terms == "all" else (None, None)
    lam = 300.0
    sqrt_precision = (lam * hess + s0).sqrt()
    scalars = dict(beta1=0.9, beta2=0.999, lam=lam, c=lam / (1 - 0.9**3), lr=0.05, clip=clip)
    torch_buffers = [t.clone() for t in (mean, hess, momentum, sqrt_precision)]
    ivon_update_(*torch_buffers[:3], grad, grad * noise, torch_buffers[3], s0, s0m0, dual_v, dual_big_v,
                 torch.empty(n), **scalars)  # fmt: skip
    native = [t.clone() for t in (mean, hess, momentum, sqrt_precision)]
    grad_noise = noise if raw_noise else grad * noise
    KERNELS.update_(*native[:3], grad, grad_noise, native[3], s0, s0m0, dual_v, dual_big_v, raw_noise=raw_noise,
                    **scalars)  # fmt: skip
    for a, b in zip(native, torch_buffers, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    assert not torch.equal(native[0], mean)  # it moved


def test_bad_buffers_are_refused_not_read_out_of_bounds():
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors of 10 elements"):
        KERNELS.sample_(torch.zeros(10), torch.zeros(10), torch.zeros(9), torch.ones(10), 1)
    with pytest.raises(ValueError, match="float32"):
        KERNELS.sample_(torch.zeros(10, dtype=torch.float64), torch.zeros(10), torch.zeros(10), torch.ones(10), 1)


def test_the_row_kernels_give_each_row_what_it_gets_alone():
    """The cohort engine's one call per step (fedvb.core.cohort): each row drawn with its own key and updated with
    its own lam and bias correction, bit for bit as the per-row calls."""
    rows, n = 3, 1001
    g = torch.Generator().manual_seed(5)

    def buffers():
        return [torch.randn(rows, n, generator=g) for _ in range(10)]

    mean, hess, momentum, grad, noise, sqrt_precision, s0, s0m0, dual_v, dual_big_v = buffers()
    sqrt_precision, s0, hess = sqrt_precision.abs() + 1, s0.abs() + 1, hess.abs()
    lam, bias, keys = [3.0, 50.0, 0.7], [30.0, 400.0, 2.0], [11, 2**40, 2**63 - 5]
    alone = [t.clone() for t in (mean, hess, momentum, sqrt_precision)]
    saved_alone, noise_alone = torch.empty(rows, n), torch.empty(rows, n)
    for r in range(rows):
        KERNELS.sample_(alone[0][r], saved_alone[r], noise_alone[r], alone[3][r], keys[r])
        KERNELS.update_(alone[0][r], alone[1][r], alone[2][r], grad[r], noise_alone[r], alone[3][r], s0[r], s0m0[r],
                        dual_v[r], dual_big_v[r], raw_noise=True, beta1=0.9, beta2=0.999, lam=lam[r], c=bias[r],
                        lr=0.1, clip=float("inf"))  # fmt: skip
    together = [t.clone() for t in (mean, hess, momentum, sqrt_precision)]
    saved, drawn = torch.empty(rows, n), torch.empty(rows, n)
    KERNELS.sample_rows_(together[0], saved, drawn, together[3], keys)
    assert torch.equal(drawn, noise_alone) and torch.equal(saved, mean)
    KERNELS.update_rows_(together[0], together[1], together[2], grad, drawn, together[3], s0, s0m0, dual_v, dual_big_v,
                         raw_noise=True, beta1=0.9, beta2=0.999, lam=torch.tensor(lam), c=torch.tensor(bias), lr=0.1,
                         clip=float("inf"))  # fmt: skip
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
