"""The core of fedvb: pure torch, no Flower, no Ray.

Gaussian families in natural parameters (:mod:`~fedvb.core.gaussian`), the
BayesADMM site update and server aggregation with the named presets
(:mod:`~fedvb.core.duality`), exact local solvers (:mod:`~fedvb.core.solvers`),
synthetic problems with known answers (:mod:`~fedvb.core.problems`) and the
plain-loop driver (:mod:`~fedvb.core.driver`).
"""

from fedvb.core.driver import DriverResult, run_plain_loop, sample_participants
from fedvb.core.duality import (
    PRESETS,
    Preset,
    aggregate,
    bayes_admm,
    bayes_admm_newton,
    bregman_admm,
    bregman_site_update,
    default_alpha,
    federated_admm,
    fedlap,
    fedlap_cov,
    ivon_admm,
    make_preset,
    pvi,
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
from fedvb.core.solvers import (
    LinearRegressionClient,
    LocalSolver,
    SoftmaxRegressionClient,
    solve_linear_regression,
    solve_softmax_regression,
)

__all__ = [
    "DENSE",
    "DIAGONAL",
    "FAMILIES",
    "ISOTROPIC",
    "PRESETS",
    "DriverResult",
    "Family",
    "Gaussian",
    "LinearRegressionClient",
    "LocalSolver",
    "NaturalParams",
    "NonPositivePrecisionError",
    "Preset",
    "SoftmaxRegressionClient",
    "aggregate",
    "bayes_admm",
    "bayes_admm_newton",
    "bregman_admm",
    "bregman_site_update",
    "default_alpha",
    "family_by_name",
    "fedlap",
    "fedlap_cov",
    "federated_admm",
    "ivon_admm",
    "make_preset",
    "pvi",
    "run_plain_loop",
    "sample_participants",
    "site_update",
    "solve_linear_regression",
    "solve_softmax_regression",
]
