"""The core of fedvb: pure torch, no Flower, no Ray.

Gaussian families in natural parameters (:mod:`~fedvb.core.gaussian`), the
BayesADMM site update and server aggregation (:mod:`~fedvb.core.duality`),
every algorithm as one typed registry entry (:mod:`~fedvb.core.registry`),
the client solvers (:mod:`~fedvb.core.client_solvers`), exact local solves
(:mod:`~fedvb.core.solvers`), synthetic problems with known answers
(:mod:`~fedvb.core.problems`) and the plain-loop driver (:mod:`~fedvb.core.driver`).
"""

from fedvb.core.client_solvers import EXACT, IVON, LAPLACE, SOLVERS, ClientSolver
from fedvb.core.driver import DriverResult, run_plain_loop, sample_participants
from fedvb.core.duality import (
    FixedAlpha,
    Preset,
    aggregate,
    bregman_site_update,
    default_alpha,
    site_update,
)
from fedvb.core.gaussian import (
    DENSE,
    DIAGONAL,
    FAMILIES,
    ISOTROPIC,
    Family,
    Gaussian,
    NaturalParams,
    NonPositivePrecisionError,
    family_by_name,
)
from fedvb.core.registry import ALGORITHMS, preset
from fedvb.core.solvers import solve_linear_regression, solve_softmax_regression

__all__ = [
    "ALGORITHMS",
    "DENSE",
    "DIAGONAL",
    "EXACT",
    "FAMILIES",
    "IVON",
    "ISOTROPIC",
    "LAPLACE",
    "SOLVERS",
    "ClientSolver",
    "DriverResult",
    "Family",
    "FixedAlpha",
    "Gaussian",
    "NaturalParams",
    "NonPositivePrecisionError",
    "Preset",
    "aggregate",
    "bregman_site_update",
    "default_alpha",
    "family_by_name",
    "preset",
    "run_plain_loop",
    "sample_participants",
    "site_update",
    "solve_linear_regression",
    "solve_softmax_regression",
]
