"""The duality study: every preset of the BayesADMM machinery against the exact answer.

Two heterogeneous problems with known centralized answers:

* Bayesian linear regression, K = 4 clients: the exact posterior;
* softmax regression, K = 5 label-skewed clients: the centralized Laplace posterior;
* the BayesADMM paper's one-step experiment (its Fig. 3b setting): MNIST at 7 x 7 (each 4 x 4 block of
  pixels averaged, inputs in [0, 1]), 10 outputs under the square loss ``1/2 ||W x - onehot(y)||^2`` (490
  weights, no bias), 5 clients by digit pairs (client k: 500 rows each of digits 2k and 2k + 1, the first in
  the training set's order), prior precision delta = 25: the exact posterior. The ten outputs' square loss is
  written as one linear regression over 490 weights (a row ``e_j kron x`` with target ``onehot(y)_j`` per
  example and output), so every preset runs on it unchanged. Needs MNIST (``--no-mnist`` leaves it out).

For each preset it prints the relative error of the server mean and precision
after selected rounds, and writes ``errors.csv`` and ``errors.png`` (error
against round, log scale) to ``--out``.  Precision errors are measured against
the answer projected onto the preset's family (its mean-field optimum).

    python simulations/duality.py --out runs/duality [--rounds 60] [--no-mnist]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fedvb.core import DENSE, DIAGONAL, Gaussian, NonPositivePrecisionError, Preset, preset, run_plain_loop  # noqa: E402
from fedvb.core.problems import (  # noqa: E402
    centralized_linear_posterior,
    centralized_softmax_laplace,
    make_linear_regression_clients,
    make_softmax_regression_clients,
)
from fedvb.data import dataset_available  # noqa: E402


def presets(num_clients: int) -> list[tuple[str, Preset]]:
    """The registry's presets, every client solving its local problem exactly (closed form or Newton)."""
    exact = {"solver": "exact"}
    return [
        ("BayesADMM-Newton rho=1/K", preset("bayes-admm-newton", rho=1 / num_clients)),
        ("BayesADMM-Newton rho=1 damping=0.5", preset("bayes-admm-newton", rho=1.0, damping=0.5)),
        ("PVI dense", preset("pvi", family=DENSE, **exact)),
        ("Bregman ADMM dense damping=0.1", preset("bregman-admm", family=DENSE, rho=1.0, damping=0.1, **exact)),
        ("BayesADMM diagonal rho=1 damping=0.5", preset("bayes-admm", family=DIAGONAL, rho=1.0, damping=0.5,
                                                         **exact)),
        ("FedLap-Cov (diag Laplace) damping=0.5", preset("fedlap-cov", damping=0.5, **exact)),
        ("FedLap damping=0.1", preset("fedlap", damping=0.1, **exact)),
        ("federated ADMM rho=1", preset("federated-admm", rho=1.0, **exact)),
    ]  # fmt: skip


def mnist_square_loss_clients(rows_per_digit: int = 500) -> list:
    """The one-step experiment's 5 digit-pair clients (module docstring), float64."""
    from fedvb.core.problems import linear_regression_client
    from fedvb.data import load_dataset

    data = load_dataset("mnist", preprocessing="raw", seed=0)
    images = torch.as_tensor(data.x_train, dtype=torch.float64).reshape(-1, 1, 28, 28)  # in [0, 1] already
    small = torch.nn.functional.avg_pool2d(images, 4).reshape(len(images), -1)  # 7 x 7 = 49 inputs
    labels = torch.as_tensor(data.y_train, dtype=torch.long)
    eye = torch.eye(10, dtype=torch.float64)
    clients = []
    for k in range(5):
        rows = torch.cat([torch.nonzero(labels == d).reshape(-1)[:rows_per_digit] for d in (2 * k, 2 * k + 1)])
        x, onehot = small[rows], eye[labels[rows]]
        # row (i, j): e_j kron x_i against onehot_ij, so that W (10 x 49, row-major) is the 490 weights
        expanded = torch.einsum("jc,nd->njcd", eye, x).reshape(len(rows) * 10, 10 * x.shape[1])
        clients.append(linear_regression_client(expanded, onehot.reshape(-1)))
    return clients


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def study(problem: str, clients, exact: Gaussian, prior_precision: float, rounds: int) -> list[dict]:
    rows = []
    for label, chosen in presets(len(clients)):
        prior = Gaussian.isotropic_prior(exact.dim, prior_precision, chosen.family)
        target_precision = chosen.family.project(exact.precision)
        try:
            servers = run_plain_loop(chosen, prior, clients, rounds).servers
        except NonPositivePrecisionError as error:
            print(f"  {label}: stopped: {error}", file=sys.stderr)
            continue
        for r, server in enumerate(servers, start=1):
            precision_error = float("nan") if chosen.point_estimate else relative(server.precision, target_precision)
            rows.append(
                dict(
                    problem=problem,
                    preset=label,
                    round=r,
                    mean_error=relative(server.mean, exact.mean),
                    precision_error=precision_error,
                )
            )
    return rows


def print_table(rows: list[dict], problem: str, rounds: int) -> None:
    shown = sorted({r for r in (1, 5, 20, rounds) if r <= rounds})
    print(f"\n{problem}: relative error of the server mean / precision after round")
    print(f"{'preset':40s}" + "".join(f"{f'r={r}':>22s}" for r in shown))
    for label in dict.fromkeys(row["preset"] for row in rows if row["problem"] == problem):
        cells = []
        for r in shown:
            row = next(x for x in rows if x["problem"] == problem and x["preset"] == label and x["round"] == r)
            cells.append(f"{row['mean_error']:9.1e} / {row['precision_error']:8.1e}")
        print(f"{label:40s}" + "".join(f"{c:>22s}" for c in cells))


def plot(rows: list[dict], path: Path) -> None:
    problems = list(dict.fromkeys(row["problem"] for row in rows))
    labels = list(dict.fromkeys(row["preset"] for row in rows))
    colors = {label: plt.cm.tab10(i) for i, label in enumerate(labels)}  # one colour per preset in every panel
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 5.0), squeeze=False)
    for ax, problem in zip(axes[0], problems):
        for label in dict.fromkeys(row["preset"] for row in rows if row["problem"] == problem):
            series = [row for row in rows if row["problem"] == problem and row["preset"] == label]
            errors = [max(row["mean_error"], 1e-17) for row in series]
            ax.semilogy([row["round"] for row in series], errors, label=label, color=colors[label])
        ax.set_title(problem)
        ax.set_xlabel("round")
        ax.set_ylabel("relative error of the server mean")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in labels]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/duality"), help="output folder (default: runs/duality)")
    parser.add_argument("--rounds", type=int, default=60, help="rounds per preset (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems (default: 0)")
    parser.add_argument("--no-mnist", action="store_true", help="leave out the MNIST 7x7 one-step problem")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    linear_clients = make_linear_regression_clients(4, 6, seed=args.seed)
    linear_exact = centralized_linear_posterior(linear_clients, Gaussian.isotropic_prior(6, 2.0, DENSE))
    softmax_clients = make_softmax_regression_clients(5, 4, 3, seed=args.seed)
    softmax_exact = centralized_softmax_laplace(softmax_clients, Gaussian.isotropic_prior(12, 1.0, DENSE))

    rows = study("linear regression, K=4 (exact posterior)", linear_clients, linear_exact, 2.0, args.rounds)
    rows += study("softmax regression, K=5 (Laplace posterior)", softmax_clients, softmax_exact, 1.0, args.rounds)
    if not args.no_mnist and not dataset_available("mnist"):
        print("MNIST not found: the one-step problem is left out (see `fedvb run --dataset mnist`)", file=sys.stderr)
    elif not args.no_mnist:
        mnist_clients = mnist_square_loss_clients()
        mnist_exact = centralized_linear_posterior(mnist_clients, Gaussian.isotropic_prior(490, 25.0, DENSE))
        rows += study("MNIST 7x7 square loss, K=5 (exact posterior)", mnist_clients, mnist_exact, 25.0, args.rounds)
    for problem in dict.fromkeys(row["problem"] for row in rows):
        print_table(rows, problem, args.rounds)

    with open(args.out / "errors.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "errors.png")
    print(f"\nwrote {args.out / 'errors.csv'} and {args.out / 'errors.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
