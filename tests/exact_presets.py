"""The registry's presets with exact client solves (closed form or Newton on the synthetic problems of
fedvb.core.problems), in the short forms the algebra tests use."""

from fedvb.core.registry import preset


def bayes_admm_newton(rho, damping=1.0):
    return preset("bayes-admm-newton", rho=rho, damping=damping)


def bayes_admm(family, rho, damping=1.0):
    return preset("bayes-admm", family=family, rho=rho, damping=damping, solver="exact")


def pvi(family, damping=1.0):
    return preset("pvi", family=family, damping=damping, solver="exact")


def bregman_admm(family, rho, damping=1.0):
    return preset("bregman-admm", family=family, rho=rho, damping=damping, solver="exact")


def fedlap(damping):
    return preset("fedlap", damping=damping, solver="exact")


def federated_admm(rho, damping=1.0):
    return preset("federated-admm", rho=rho, damping=damping, solver="exact")
