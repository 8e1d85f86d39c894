"""Steps per second of fedvb's IVON against torch.optim.Adam and SGD, measured side by side.

The papers' MLP (784-200-100-10, sigmoid), batch 32, one torch thread, one
Monte Carlo sample per IVON step.  fedvb's IVON is timed with its torch kernels
and (on a CPU with a C compiler) its fused native kernels.  Each optimizer trains its own copy of the
model on the same random batches; blocks of steps are interleaved across
optimizers and repeated, and the median block time is reported, so machine
noise hits every optimizer alike.  If the GPL ``ivon-opt`` package happens to
be installed it is timed too (it is not a dependency).

    python benchmarks/ivon_speed.py [--steps 200] [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fedvb.core import ivon_native
from fedvb.core.ivon import IVON


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 200),
        torch.nn.Sigmoid(),
        torch.nn.Linear(200, 100),
        torch.nn.Sigmoid(),
        torch.nn.Linear(100, 10),
    )


def make_steppers(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], None]]:
    loss_fn = torch.nn.CrossEntropyLoss()
    steppers = {}

    def plain(opt_factory):
        model = mlp().to(device)
        opt = opt_factory(model.parameters())

        def step(x, y):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        return step

    def ivon_step(model, opt):
        def step(x, y):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
            opt.step()

        return step

    steppers["SGD"] = plain(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    steppers["Adam"] = plain(lambda p: torch.optim.Adam(p, lr=1e-3))
    steppers["Adam(foreach)"] = plain(lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True))
    steppers["Adam(fused)"] = plain(lambda p: torch.optim.Adam(p, lr=1e-3, fused=True))
    kernels = ["torch"] + (["native"] if device.type == "cpu" and ivon_native.load() is not None else [])
    for kernel in kernels:
        model = mlp().to(device)
        opt = IVON(
            model.parameters(), lr=0.1, ess=6000.0, prior_precision=0.6, hess_init=0.1, beta2=0.9999, kernel=kernel
        )
        steppers[f"IVON ({kernel})"] = ivon_step(model, opt)
    try:
        import ivon  # GPL-3 ivon-opt, timed only when present

        model = mlp().to(device)
        steppers["IVON (ivon-opt)"] = ivon_step(model, ivon.IVON(model.parameters(), lr=0.1, ess=6000.0))
    except ImportError:
        pass
    return steppers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block (default 100)")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per optimizer (default 15)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    batches = [(torch.randn(32, 784, device=device), torch.randint(0, 10, (32,), device=device)) for _ in range(50)]
    steppers = make_steppers(device)

    def block(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(args.steps):
            step(*batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    num_params = sum(p.numel() for p in mlp().parameters())
    noise = torch.empty(num_params, device=device)
    steppers["(normal_ fill only)"] = lambda x, y: noise.normal_()  # the draw every IVON step needs

    for step in steppers.values():  # warm-up
        block(step)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.repeats):
        for name, step in steppers.items():
            times[name].append(block(step))
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    print(
        f"MLP 784-200-100-10, batch 32, {torch.get_num_threads()} thread(s), device {device}, torch {torch.__version__}"
    )
    print(f"median and best of {args.repeats} interleaved blocks of {args.steps} steps")
    print(f"{'optimizer':18s} {'steps/s':>9s} {'ms/step':>9s} {'/ Adam':>8s} {'best ms':>9s} {'/ Adam':>8s}")
    for name in median:
        print(
            f"{name:18s} {1 / median[name]:9.0f} {1e3 * median[name]:9.3f} {median[name] / median['Adam']:8.2f}"
            f" {1e3 * best[name]:9.3f} {best[name] / best['Adam']:8.2f}"
        )
    print(f"(normal_ fill only): one N(0, 1) draw for all {num_params} weights, the floor IVON adds to a step")
    best_kernel = "IVON (native)" if "IVON (native)" in median else "IVON (torch)"
    ratio = median[best_kernel] / median["Adam"]
    strongest = min((n for n in median if n.startswith("Adam")), key=median.get)  # what a user would pick
    print(f"\n{best_kernel} / Adam step-time ratio (medians): {ratio:.2f}")
    print(f"{best_kernel} / {strongest} (the fastest Adam here, fedvb's MAP clients use fused Adam): "
          f"{median[best_kernel] / median[strongest]:.2f} (target <= 1.30)")  # fmt: skip


if __name__ == "__main__":
    main()
