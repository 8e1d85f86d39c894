"""The core and IVON on CUDA tensors give the CPU's numbers (runs where a GPU exists)."""

import pytest
import torch

from fedvb.core.driver import run_plain_loop
from fedvb.core.gaussian import DENSE, DIAGONAL, Gaussian
from fedvb.core.ivon import IVON
from fedvb.core.problems import centralized_linear_posterior, linear_regression_client, make_linear_regression_clients
from tests.exact_presets import bayes_admm, bayes_admm_newton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_one_round_exactness_on_cuda():
    clients = make_linear_regression_clients(4, 6, seed=0)
    on_gpu = [linear_regression_client(c.x, c.y, device=CUDA) for c in clients]
    prior = Gaussian.isotropic_prior(6, 2.0, DENSE, device=CUDA)
    server = run_plain_loop(bayes_admm_newton(rho=0.25), prior, on_gpu, rounds=1).final
    exact = centralized_linear_posterior(clients, Gaussian.isotropic_prior(6, 2.0, DENSE))
    assert server.mean.device.type == "cuda"
    torch.testing.assert_close(server.mean.cpu(), exact.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(server.precision.cpu(), exact.precision, rtol=1e-10, atol=1e-12)


def test_diagonal_algebra_on_cuda_matches_cpu():
    clients = make_linear_regression_clients(4, 6, seed=1)
    on_gpu = [linear_regression_client(c.x, c.y, device=CUDA) for c in clients]
    preset = bayes_admm(DIAGONAL, rho=1.0, damping=0.5)  # IVON-ADMM's algebra, with exact client solves
    cpu = run_plain_loop(preset, Gaussian.isotropic_prior(6, 2.0, DIAGONAL), clients, rounds=20).final
    gpu = run_plain_loop(preset, Gaussian.isotropic_prior(6, 2.0, DIAGONAL, device=CUDA), on_gpu, rounds=20).final
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.precision.cpu(), cpu.precision, rtol=1e-9, atol=1e-12)


def test_ivon_on_cuda_matches_cpu_step_for_step():
    def make(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(device)
        opt = IVON(model.parameters(), lr=0.05, ess=100.0, prior_precision=5.0, hess_init=0.3, beta2=0.99)
        opt.set_dual(torch.linspace(-1, 1, opt.num_trainable, dtype=torch.float64, device=device), -0.5)
        return model, opt

    (cpu_model, cpu_opt), (gpu_model, gpu_opt) = make("cpu"), make(CUDA)
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        noise = torch.randn(cpu_opt.num_trainable, generator=g, dtype=torch.float64)
        for model, opt, device in ((cpu_model, cpu_opt, "cpu"), (gpu_model, gpu_opt, CUDA)):
            with opt.sampled_params(train=True, noise=noise.to(device)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    torch.testing.assert_close(gpu_opt.posterior().mean.cpu(), cpu_opt.posterior().mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu_opt.posterior().precision.cpu(), cpu_opt.posterior().precision, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold", "fedlap-cov", "fedlap-func", "ivon-admm"])
def test_clients_train_on_the_gpu_they_are_given(strategy):
    """device=cuda puts each client's model and data on the GPU; the run matches the CPU run."""
    from fedvb.config import RunConfig
    from fedvb.core.driver import run_algorithm
    from fedvb.experiment import client_generator, evaluate, initial_mean, make_algorithm, make_trainer

    def run_on(device: str):
        values = dict(strategy=strategy, dataset="digits", num_clients=4, rounds=2, hidden="32", activation="relu",
                      lr=3e-3, device=device, eval_samples=0)  # fmt: skip
        if strategy == "ivon-admm":  # the digits demonstration settings (configs/digits-ivon-admm.toml)
            values.update(lr=2e-4, temperature=1e-3, rho=0.2, damping=1e-3, ivon_beta2=0.9998,
                          ivon_hess_init=1e-3, local_epochs=5)  # fmt: skip
        config = RunConfig.from_mapping(values)
        trainers = [make_trainer(config, k) for k in range(config.num_clients)]
        assert all(t.x.device.type == torch.device(device).type for t in trainers)
        algorithm = make_algorithm(config)
        server = run_algorithm(
            algorithm, trainers, config.rounds, initial_mean(config),
            generator_for=lambda r, k: client_generator(config, r, k),
        )  # fmt: skip
        mean = algorithm.server_mean(server).cpu()
        return mean, evaluate(config.replace(device="cpu"), mean, None)["accuracy"]

    (cpu, cpu_accuracy), (gpu, gpu_accuracy) = run_on("cpu"), run_on("cuda")
    if strategy == "ivon-admm":
        # Its weight noise comes from the GPU's own generator: the same law, other draws, so the
        # weights differ; the model it learns must be as good.
        assert gpu_accuracy > 0.5 and abs(gpu_accuracy - cpu_accuracy) <= 0.05
    else:
        assert ((gpu - cpu).norm() / cpu.norm()).item() <= 1e-3


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold", "ivon-admm"])
def test_the_cohort_engine_on_the_gpu_gives_the_loops_numbers(strategy):
    """engine = vectorised on CUDA (fedvb.core.cohort): the clients' stacked weights, batches and IVON noise on
    the GPU; the same numbers as the per-client loop on the GPU, to float tolerance."""
    from fedvb.config import RunConfig
    from fedvb.core.driver import run_algorithm
    from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer

    config = RunConfig.from_mapping(dict(strategy=strategy, dataset="digits", num_clients=6, rounds=2, hidden="32",
                                         lr=3e-3, device="cuda", eval_samples=0, local_epochs=2))  # fmt: skip

    def run_with(engine: str) -> torch.Tensor:
        algorithm = make_algorithm(config)
        server = run_algorithm(
            algorithm, [make_trainer(config, k) for k in range(config.num_clients)], config.rounds,
            initial_mean(config), generator_for=lambda r, k: client_generator(config, r, k), engine=engine,
        )  # fmt: skip
        return algorithm.server_mean(server).cpu()

    loop, vectorised = run_with("loop"), run_with("vectorised")
    assert ((vectorised - loop).norm() / loop.norm()).item() <= 1e-4
