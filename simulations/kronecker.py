"""The Kronecker-factored family against the diagonal and the dense one: how close each federated server
posterior comes to the centralised Laplace posterior (docs/algorithms.md §10).

Two problems with a known centralised answer:

* softmax regression, K = 5 label-skewed clients (fedvb.core.problems; P = 12), every client solving its local
  problem exactly (Newton): PVI's site-sum server (alpha = rho = 1) with the diagonal, the Kronecker and the
  dense family, undamped and damped by 0.5, 60 rounds;
* an MLP (64-16-10, sigmoid; P = 1,210) on sklearn's digits, K = 10 clients on the papers' split. The
  centralised answer is the MAP m* of the pooled clients' data under the prior (L-BFGS) and the exact GGN
  there (autograd), plus the prior. At m*, each family's server precision from the clients' Laplace
  curvatures there (the diagonal GGN, K-FAC; the dense family would hold the exact GGN); then FedLap-Cov and
  FedLap-KFAC run federated (Laplace clients: MAP by Adam, then the family's curvature; sites damped by 0.1,
  30 rounds), scored on the test set beside the centralised MAP.

It prints (and writes to OUT/kronecker.md) the relative error of the server mean and of the server precision
(Frobenius norm of the dense matrix), next to the best the family can do (its own projection of the
centralised precision), KL(family || exact) at one mean, and test metrics.

    .venv/bin/python simulations/kronecker.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fedvb.config import RunConfig
from fedvb.core import DENSE, DIAGONAL, Gaussian, preset, run_plain_loop
from fedvb.core.driver import run_algorithm
from fedvb.core.problems import centralized_softmax_laplace, make_softmax_regression_clients
from fedvb.core.trainers import TorchTrainer
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer, prepare
from fedvb.metrics import score

F64 = torch.float64
MLP = {"dataset": "digits", "model": "mlp", "hidden": "16", "activation": "sigmoid", "num_clients": 10,
       "partition": "papers-dirichlet", "seed": 0, "rounds": 30, "lr": 0.01, "local_epochs": 5, "damping": 0.1,
       "prior_precision": 1.0, "workers": 1, "batch_size": 32, "round_one_anchor": "init"}  # fmt: skip


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def softmax_rows(rounds: int) -> list[dict]:
    clients = make_softmax_regression_clients(5, 4, 3, seed=0)
    exact = centralized_softmax_laplace(clients, Gaussian.isotropic_prior(12, 1.0, DENSE))
    rows = []
    for damping in (1.0, 0.5):
        for name, chosen in (
            ("diagonal", preset("pvi", family=DIAGONAL, solver="exact", damping=damping)),
            ("kronecker", preset("fedlap-kfac", solver="exact", damping=damping).bound_to(clients[0].model)),
            ("dense", preset("pvi", family=DENSE, solver="exact", damping=damping)),
        ):
            server = run_plain_loop(chosen, Gaussian.isotropic_prior(12, 1.0, chosen.family), clients, rounds).final
            best = chosen.family.to_dense(chosen.family.project(exact.precision), 12)
            rows.append({"problem": "softmax regression, K=5, P=12", "family": name, "damping": damping,
                         "mean": relative(server.mean, exact.mean),
                         "precision": relative(server.dense_precision(), exact.precision),
                         "best": relative(best, exact.precision),
                         "kl": kl_to_exact(server.dense_precision(), exact.precision)})  # fmt: skip
    return rows


def centralised_mlp(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The MAP of the pooled clients' data under N(0, 1/delta) (L-BFGS, float64) and the exact GGN there."""
    prepared = prepare(config)
    rows = np.concatenate(prepared.parts)  # every client's training rows
    x = torch.as_tensor(prepared.dataset.x_train[rows]).double()
    y = torch.as_tensor(prepared.dataset.y_train[rows])
    model = float64_trainer(config, 0).model
    names = [name for name, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = initial_mean(config).clone().requires_grad_(True)

    def unflatten(flat):
        pieces, start = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            pieces[name] = flat[start : start + size].view(shape)
            start += size
        return pieces

    def objective():
        optimiser.zero_grad()
        logits = torch.func.functional_call(model, unflatten(theta), (x,))
        value = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        value = value + 0.5 * config.prior_precision * theta.square().sum()
        value.backward()
        return value

    optimiser = torch.optim.LBFGS([theta], lr=1.0, max_iter=2000, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    optimiser.step(objective)
    mode = theta.detach()

    def logits_of(flat, example):
        return torch.func.functional_call(model, unflatten(flat), (example.unsqueeze(0),))[0]

    jacobians = torch.func.vmap(torch.func.jacrev(logits_of), in_dims=(None, 0))(mode, x)  # (N, C, P)
    probs = torch.softmax(torch.func.functional_call(model, unflatten(mode), (x,)), -1)
    weighted = jacobians * probs.sqrt().unsqueeze(-1)
    mean_part = torch.einsum("nc,ncp->np", probs.sqrt(), weighted)  # sum_c p_c J_c per example
    ggn = torch.einsum("ncp,ncq->pq", weighted, weighted) - mean_part.T @ mean_part  # J^T (diag p - p p^T) J
    precision = ggn + config.prior_precision * torch.eye(mode.numel(), dtype=F64)
    return mode, precision


def float64_trainer(config: RunConfig, client: int) -> TorchTrainer:
    """``client``'s trainer of ``config`` in float64 (model and data)."""
    trainer = make_trainer(config, client)
    return TorchTrainer(trainer.model.double(), trainer.x.double(), trainer.y, trainer.task, trainer.settings)


def kl_to_exact(precision: torch.Tensor, exact: torch.Tensor) -> float:
    """``KL(N(m, S^-1) || N(m, S_exact^-1))`` of two Gaussians at one mean (dense, float64)."""
    dim = precision.shape[0]
    return float(0.5 * (torch.trace(torch.linalg.solve(precision, exact)) - dim + torch.logdet(precision)
                        - torch.logdet(exact)))  # fmt: skip


def mlp_rows() -> list[dict]:
    """At the centralised MAP m*: each family's server precision from every client's Laplace curvature there
    (prior plus the family's sum of the clients' curvatures: what the site-sum server holds once every site is
    a client's curvature), against the exact GGN; then the federated runs' test metrics (an MLP's weights are
    not identifiable, so errors of the means would compare different modes)."""
    configs = {
        strategy: RunConfig.from_mapping({**MLP, "strategy": strategy}) for strategy in ("fedlap-cov", "fedlap-kfac")
    }
    mode, exact = centralised_mlp(configs["fedlap-cov"])
    dim, problem = mode.numel(), "digits MLP 64-16-10, K=10, P=1210"
    rows = []
    for config in configs.values():
        family = make_algorithm(config).preset.family
        trainers = [float64_trainer(config, k) for k in range(config.num_clients)]
        curvatures = [family.laplace_curvature(t, mode, generator=None).to(F64) for t in trainers]
        prior = family.eye(dim, config.prior_precision, dtype=F64)
        precision = family.to_dense(family.total([prior, *curvatures]), dim)
        best = family.to_dense(family.project(exact), dim)
        rows.append({"problem": problem + " (at the MAP)", "family": family.name, "damping": "-",
                     "precision": relative(precision, exact), "best": relative(best, exact),
                     "kl": kl_to_exact(precision, exact)})  # fmt: skip
    rows.append({"problem": problem + " (at the MAP)", "family": "dense", "damping": "-", "precision": 0.0,
                 "best": 0.0, "kl": 0.0})  # fmt: skip
    dataset = prepare(configs["fedlap-cov"]).dataset
    x_test, y_test = torch.as_tensor(dataset.x_test).double(), torch.as_tensor(dataset.y_test)
    evaluator = float64_trainer(configs["fedlap-cov"], 0)
    for strategy, config in configs.items():
        algorithm = make_algorithm(config)
        server = run_algorithm(
            algorithm, [make_trainer(config, k) for k in range(config.num_clients)], config.rounds,
            initial_mean(config), generator_for=lambda r, k, c=config: client_generator(c, r, k),
        )  # fmt: skip
        test = score(evaluator.predict(algorithm.server_mean(server), x_test), y_test, "classification")
        rows.append({"problem": f"{problem} ({config.rounds} rounds, {strategy})", "family": strategy,
                     "damping": config.damping, **test})  # fmt: skip
    central = score(evaluator.predict(mode, x_test), y_test, "classification")
    rows.append({"problem": f"{problem} (centralised MAP)", "family": "-", "damping": "-", **central})
    return rows


def table(rows: list[dict]) -> str:
    columns = [("mean", "server mean error", ".3g"), ("precision", "server precision error", ".3g"),
               ("best", "family's best", ".3g"), ("kl", "KL to the exact", ".3g"), ("accuracy", "test accuracy", ".4f"),
               ("nll", "test NLL", ".4f"), ("ece", "test ECE", ".4f")]  # fmt: skip
    lines = ["| problem | family | damping | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for r in rows:
        cells = [format(r[key], spec) if key in r else "-" for key, _, spec in columns]
        lines.append(f"| {r['problem']} | {r['family']} | {r['damping']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = softmax_rows(60) + mlp_rows()
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kronecker.md").write_text(
        "# The Kronecker-factored family against the diagonal and the dense one\n\n"
        "Command: `.venv/bin/python simulations/kronecker.py` (docs/algorithms.md §10 for the family; relative "
        "errors against the centralised Laplace posterior; \"family's best\": the family's own projection of the "
        "centralised precision).\n\n" + text + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
