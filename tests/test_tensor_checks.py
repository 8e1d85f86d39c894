"""The reply screen's one-pass checks answer as torch's own: all_finite as isfinite().all(), and the
diagonal family's positivity check as its masks."""

import torch

from fedvb.core.gaussian import DIAGONAL
from fedvb.core.tensor_checks import all_finite

SPECIAL = [float("nan"), float("inf"), -float("inf")]


def random_tensors(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(int(torch.randint(0, 9, (1,), generator=generator)), generator=generator, dtype=torch.float64)
        if x.numel() and torch.rand(1, generator=generator) < 0.5:
            where = int(torch.randint(0, x.numel(), (1,), generator=generator))
            x[where] = SPECIAL[int(torch.randint(0, 3, (1,), generator=generator))]
        yield x, generator


def test_all_finite_is_isfinite_all():
    for x, _ in random_tensors(3000):
        assert all_finite(x) == bool(torch.isfinite(x).all()), x
    assert all_finite(torch.tensor(2.0)) and not all_finite(torch.tensor(float("nan")))


def test_the_diagonal_positivity_check_says_what_is_wrong():
    for x, _ in random_tensors(2000, seed=2):
        if not x.numel():
            continue
        problem = DIAGONAL.positivity_problem(x)
        expected_ok = bool(torch.isfinite(x).all()) and bool((x > 0).all())
        assert (problem is None) == expected_ok, (x, problem)
        if not bool(torch.isfinite(x).all()):
            assert "non-finite" in problem
        elif not expected_ok:
            assert "<= 0" in problem
