"""fedvb: federated ADMM and variational Bayes as one algorithm, on Flower, IVON and Ray."""

__version__ = "0.1.0"
