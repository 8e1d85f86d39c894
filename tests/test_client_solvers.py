"""Every client solver through the same properties, on Bayesian linear regression (a quadratic, where the
answer is known in closed form): one protocol, one client-precision formula, the exact answer where the
solver can reach it."""

import pytest
import torch

from fedvb.core.client_solvers import EXACT, IVON, LAPLACE, SOLVERS
from fedvb.core.gaussian import DENSE, DIAGONAL, ISOTROPIC, Gaussian, NaturalParams
from fedvb.core.solvers import solve_linear_regression
from fedvb.core.trainers import LocalSettings, TorchTrainer

FAMILIES = (ISOTROPIC, DIAGONAL, DENSE)


def regression_client(settings: LocalSettings, dtype: torch.dtype = torch.float64) -> TorchTrainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(
        64, generator=g, dtype=torch.float64
    )
    model = torch.nn.Linear(3, 1, bias=False).to(dtype)
    return TorchTrainer(model, x.to(dtype), y.to(dtype), "regression", settings)


def server_and_site(family):
    g = torch.Generator().manual_seed(1)
    precision = {ISOTROPIC: torch.tensor(2.0), DIAGONAL: torch.tensor([1.0, 2.0, 3.0]),
                 DENSE: torch.tensor([[2.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 2.0]])}[family].double()  # fmt: skip
    server = Gaussian(torch.randn(3, generator=g, dtype=torch.float64), precision, family)
    site = NaturalParams(0.1 * torch.randn(3, generator=g, dtype=torch.float64), 0.1 * precision, family)
    return server, site


def solve(solver, trainer, family, **kw):
    server, site = server_and_site(family)
    options = dict(rho=0.5, temperature=1.0, point_estimate=False, generator=torch.Generator().manual_seed(2),
                   state={}, first_round=True) | kw  # fmt: skip
    return solver.solve(trainer, server, site, **options), server, site


def test_the_registry_of_solvers_names_each_once():
    assert SOLVERS == {"exact": EXACT, "laplace": LAPLACE, "ivon": IVON}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_is_the_closed_form(family):
    trainer = regression_client(LocalSettings())
    (posterior, state), server, site = solve(EXACT, trainer, family)
    expected = solve_linear_regression(trainer.x, trainer.y, server, site, rho=0.5)
    assert state == {}
    torch.testing.assert_close(posterior.mean, expected.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(posterior.precision, expected.precision, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_laplace_reaches_the_exact_mode_and_uses_the_diagonal_curvature(family):
    """MAP by Adam on the cavity objective lands on the exact mode; its precision is the one formula with
    the family's version of the diagonal GGN (for linear regression, diag(X^T X))."""
    trainer = regression_client(LocalSettings(lr=0.05, local_epochs=300, batch_size=64))
    (posterior, _), server, site = solve(LAPLACE, trainer, family)
    exact = solve_linear_regression(trainer.x, trainer.y, server, site, rho=0.5)
    torch.testing.assert_close(posterior.mean, exact.mean, rtol=0, atol=1e-4)
    curvature = family.from_diagonal((trainer.x**2).sum(0))
    expected = server.precision + (curvature - site.quadratic) / 0.5
    torch.testing.assert_close(posterior.precision, expected, rtol=1e-12, atol=1e-12)
    if family is not DENSE:  # diagonal and isotropic: the projection of the exact Hessian is the same thing
        torch.testing.assert_close(posterior.precision, exact.precision, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_point_estimate_keeps_the_server_precision(family):
    trainer = regression_client(LocalSettings(lr=0.05, local_epochs=5, batch_size=64))
    for solver in (EXACT, LAPLACE):
        (posterior, _), server, _ = solve(solver, trainer, family, point_estimate=True)
        assert torch.equal(posterior.precision, server.precision)


def test_ivon_serves_diagonal_families_and_keeps_its_state():
    assert IVON.supports(DENSE) is not None and IVON.supports(DIAGONAL) is None and IVON.supports(ISOTROPIC) is None
    trainer = regression_client(LocalSettings(lr=0.05, local_epochs=2, batch_size=16, ivon_kernel="torch"))
    (posterior, state), _, _ = solve(IVON, trainer, DIAGONAL)
    assert set(state) == {"ivon_momentum", "ivon_step"} and float(state["ivon_step"]) == 8
    assert bool((posterior.precision > 0).all())


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_an_ivon_clip_radius_bounds_each_step_and_engages(kernel):
    """``ivon_clip_radius`` r: every coordinate of the mean moves at most lr r a step (IVON clips the
    preconditioned step before the learning rate), so at most steps lr r in all; the unclipped client moves
    further, so the bound is the clip's doing, not the problem's."""
    from fedvb.core import ivon_native

    if kernel == "native" and ivon_native.load() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    lr, radius, steps = 0.05, 0.5, 8  # 64 rows in batches of 16, 2 epochs
    moved = {}
    for clip in (0.0, radius):
        settings = LocalSettings(lr=lr, local_epochs=2, batch_size=16, ivon_kernel=kernel, ivon_clip_radius=clip)
        trainer = regression_client(settings, torch.float32)  # the native kernels serve float32
        (posterior, state), server, _ = solve(IVON, trainer, DIAGONAL, rho=0.05)
        assert float(state["ivon_step"]) == steps
        moved[clip] = float((posterior.mean - server.mean).abs().max())
    assert moved[radius] <= steps * lr * radius * (1 + 1e-5), moved
    assert moved[0.0] > 1.5 * steps * lr * radius, moved


@pytest.mark.parametrize("family", FAMILIES)
def test_from_diagonal_is_the_projection_of_the_diagonal_matrix(family):
    d = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(family.from_diagonal(d), family.project(torch.diag(d)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("solver", [EXACT, LAPLACE, IVON])
def test_no_solver_writes_into_the_servers_tensors(solver):
    """A float64 model on float64 data: training must not alias the server's mean (it once did, through
    vector_to_parameters, so the site step then saw the client's mode as the server's)."""
    trainer = regression_client(LocalSettings(lr=0.05, local_epochs=3, batch_size=16, ivon_kernel="torch"))
    server, site = server_and_site(DIAGONAL)
    before = (server.mean.clone(), server.precision.clone(), site.linear.clone(), site.quadratic.clone())
    solver.solve(trainer, server, site, rho=0.5, temperature=1.0, point_estimate=False,
                 generator=torch.Generator().manual_seed(2), state={}, first_round=True)  # fmt: skip
    after = (server.mean, server.precision, site.linear, site.quadratic)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
