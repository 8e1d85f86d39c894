"""The main job: the duality study writes its table, CSV and plot, with the known answers in them."""

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))

import duality  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fedvb.data import dataset_available  # noqa: E402
from tests.marks import IN_CI  # noqa: E402


def test_duality_study_writes_results_with_one_round_exactness(tmp_path, capsys):
    assert duality.main(["--out", str(tmp_path), "--rounds", "2"]) == 0
    with open(tmp_path / "errors.csv") as handle:
        rows = list(csv.DictReader(handle))
    newton = [r for r in rows if r["preset"] == "BayesADMM-Newton rho=1/K" and r["problem"].startswith("linear")]
    assert float(newton[0]["mean_error"]) <= 1e-10 and float(newton[0]["precision_error"]) <= 1e-10
    damped = [
        r for r in rows if r["preset"].startswith("BayesADMM-Newton rho=1 ") and r["problem"].startswith("linear")
    ]
    assert float(damped[0]["mean_error"]) > 1e-4
    one_step = [r for r in rows if r["preset"] == "BayesADMM-Newton rho=1/K" and r["problem"].startswith("MNIST")]
    bregman = [r for r in rows if r["preset"].startswith("Bregman") and r["problem"].startswith("MNIST")]
    if IN_CI or dataset_available("mnist"):  # the paper's own one-step setting: exact after round 1, Bregman not
        assert float(one_step[0]["mean_error"]) <= 1e-10 and float(bregman[0]["mean_error"]) > 0.1
    assert (tmp_path / "errors.png").stat().st_size > 10_000
    assert "softmax regression" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted([*ROOT.glob("configs/*.toml"), *ROOT.glob("simulations/*.toml")])


@pytest.mark.parametrize("toml", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_published_experiment_file_is_a_valid_runnable_configuration(toml):
    """What the README and the studies tell users to run loads, validates and finds its data and model."""
    from fedvb.config import RunConfig
    from fedvb.experiment import check_runnable

    config = RunConfig.from_sources(toml, {})
    if not IN_CI and not dataset_available(config.dataset):
        pytest.skip(f"dataset files not found: {config.dataset}")
    check_runnable(config)


def test_an_experiments_published_baseline_settings_reach_the_runs_configuration(tmp_path, monkeypatch):
    """simulations/fmnist_heterogeneous.py's per-experiment baselines: each names a published TOML, and the run it
    configures takes the paper's value over the study's stated choice and the TOML's IVON-ADMM value."""
    import fmnist_heterogeneous as study

    from fedvb.config import RunConfig

    for experiment in study.EXPERIMENT_BASELINE:
        assert (ROOT / "simulations" / f"{experiment}.toml").is_file(), experiment
    toml = ROOT / "simulations" / "mnist_two_class.toml"
    made = []
    monkeypatch.setattr(study, "run", lambda config, overwrite: made.append(config))  # not the run: hours here
    for strategy in ("fedlap", "fedlap-cov", "feddyn", "fedavg", "ivon-admm"):
        study.run_folder(strategy, 62, 10, tmp_path, toml)
    by_strategy = {config.strategy: config for config in made}
    assert (by_strategy["fedlap"].damping, by_strategy["fedlap"].prior_precision) == (0.01, 1.0)
    assert (by_strategy["fedlap-cov"].damping, by_strategy["fedlap-cov"].prior_precision) == (0.01, 1e-4)
    assert by_strategy["feddyn"].weight_decay == 1e-6 and by_strategy["feddyn"].lr == 1e-3
    published = RunConfig.from_sources(toml, {})
    assert (by_strategy["ivon-admm"].lr, by_strategy["ivon-admm"].rho) == (published.lr, published.rho) == (0.02, 5.0)
    assert by_strategy["fedavg"].num_clients == 100 and by_strategy["fedavg"].partition == "two-class"


def test_a_study_reuses_a_finished_run_unless_a_key_it_reads_changed(tmp_path, monkeypatch):
    """The study's reuse rule: a finished run (config.toml and summary.json at the planned round) is kept when
    only keys its strategy does not read differ (another strategy's new default), and run again when one it
    reads differs."""
    import fmnist_heterogeneous as study

    from fedvb.config import RunConfig

    toml = ROOT / "simulations" / "mnist_two_class.toml"
    made = []
    monkeypatch.setattr(study, "run", lambda config, overwrite: made.append(config))

    def finish(strategy: str, **changed) -> None:
        """A finished run of ``strategy`` as the study would plan it, with ``changed`` keys."""
        study.run_folder(strategy, 62, 10, tmp_path, toml)
        planned = made.pop().replace(**changed)
        folder = tmp_path / strategy / "seed62"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(planned.to_toml())
        (folder / "summary.json").write_text('{"round": 10}')

    finish("fedavg", func_lr=0.001)  # fedlap-func's key: FedAvg does not read it
    study.run_folder("fedavg", 62, 10, tmp_path, toml)
    assert made == []
    finish("fedlap-func", func_lr=0.001)  # ... and FedLap-Func does
    study.run_folder("fedlap-func", 62, 10, tmp_path, toml)
    assert [config.strategy for config in made] == ["fedlap-func"] and made[0].func_lr == RunConfig().func_lr


def test_the_negative_elbo_estimate_has_its_known_answers():
    """At the prior the KL is 0; for a near point mass the expectation is the data's NLL at the mean."""
    import negative_elbo

    from fedvb.core import DIAGONAL, Gaussian

    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 6, generator=generator, dtype=torch.float64), torch.randint(10, (30,), generator=generator)
    prior = Gaussian.isotropic_prior(60, 10.0, DIAGONAL)
    noise = torch.randn(50, 60, generator=generator, dtype=torch.float64)
    assert negative_elbo.negative_elbo(prior, prior, x, y, noise)["kl"] == 0.0
    mean = torch.randn(60, generator=generator, dtype=torch.float64)
    sharp = Gaussian(mean, torch.full((60,), 1e14, dtype=torch.float64), DIAGONAL)
    at_mean = torch.nn.functional.cross_entropy(x @ mean.reshape(10, 6).T, y, reduction="sum")
    measured = negative_elbo.negative_elbo(sharp, prior, x, y, noise)
    assert abs(measured["expected_nll"] - float(at_mean)) <= 1e-5 * float(at_mean)
    assert measured["negative_elbo"] == measured["expected_nll"] + measured["kl"]


def test_the_negative_elbo_study_writes_every_methods_curve(tmp_path):
    """The BayesADMM paper's Fig. 3a setting at a small size: every method lowers the server's negative ELBO from
    the prior's, the rows start from the same prior, and the CSV and picture are written."""
    import negative_elbo

    if not IN_CI and not dataset_available("mnist"):
        pytest.skip("MNIST not found")
    assert negative_elbo.main(["--out", str(tmp_path), "--rounds", "2", "--steps", "20", "--rows-per-digit", "50"]) == 0
    with open(tmp_path / "elbo.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[int(row["round"])] = float(row["negative_elbo"])
    assert set(by_method) == {"BayesADMM", "Bregman ADMM", "PVI", "damped PVI"}
    assert len({curve[0] for curve in by_method.values()}) == 1  # the same prior, the same noise
    assert all(sorted(curve) == [0, 1, 2] and curve[2] < curve[0] for curve in by_method.values())
    assert (tmp_path / "elbo.png").stat().st_size > 10_000


def _mlp_with(activation: str, biases: list[float], hidden: int = 4) -> torch.nn.Module:
    """A one-hidden-layer MLP with zero weights: each hidden unit's input is its bias, whatever the row."""
    from fedvb.models import mlp

    model = mlp((3,), 2, hidden=(hidden,), activation=activation)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model[1].bias.copy_(torch.tensor(biases))
    return model


def test_the_hidden_unit_profile_has_its_known_answers():
    """simulations/hidden_units.py: a unit is saturated where its activation's slope is below a tenth of the
    largest (sigmoid(10) has slope 4.5e-5 against 0.25; a ReLU below zero has none)."""
    import hidden_units

    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert hidden_units.hidden_units(_mlp_with("sigmoid", [10, -10, 0, 1]), x) == [(0.5, 0.0)]
    assert hidden_units.hidden_units(_mlp_with("relu", [-1, -1, -1, 1]), x) == [(0.75, 0.0)]
    assert hidden_units.hidden_units(_mlp_with("tanh", [0.5, -0.5, 3, -3]), x) == [(0.5, 0.0)]
    model = _mlp_with("sigmoid", [0, 0, 0, 0])
    with torch.no_grad():
        model[1].weight.copy_(0.5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    ((saturated, spread),) = hidden_units.hidden_units(model, x)
    assert saturated == 0.0 and 0.05 < spread < 0.25  # unit inputs of std about 0.9, within |z| < 3.6


def _digits_run(tmp_path) -> tuple[Path, list[dict], np.ndarray]:
    """A small IVON-ADMM configuration on digits (an MLP of two sigmoid layers, 3 rounds, cosine schedule) and
    what `fedvb run` writes for it: the metrics rows and the final server mean."""
    from fedvb.backends import run
    from fedvb.config import RunConfig

    toml = tmp_path / "small.toml"
    toml.write_text('strategy = "ivon-admm"\ndataset = "digits"\nmodel = "mlp"\nhidden = "16,8"\nnum_clients = 3\n'
                    'rounds = 3\nlocal_epochs = 1\nlr = 0.05\nlr_schedule = "cosine"\n')  # fmt: skip
    run(RunConfig.from_sources(toml, {"out": str(tmp_path / "run")}))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        return toml, rows, z["mean"]


def test_the_hidden_unit_study_follows_the_runs_server_model(tmp_path):
    """Its loop is the run's: the server accuracy it prints each round is the one `fedvb run` writes for the
    same configuration (its first 2 of 3 rounds, the schedule spanning 3), and it profiles every hidden layer
    of the server and the clients each round."""
    import hidden_units

    toml, written, _ = _digits_run(tmp_path)
    assert hidden_units.main([str(toml), "--rounds", "2", "--out", str(tmp_path / "units.csv")]) == 0
    with open(tmp_path / "units.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["round"], r["layer"]) for r in rows] == [(str(i), str(j)) for i in range(3) for j in (1, 2)]
    accuracy = [float(r["accuracy"]) for r in rows if r["layer"] == "1"][1:]
    assert accuracy == pytest.approx([row["accuracy"] for row in written[:2]], abs=1e-6)
    assert rows[0]["client_saturated"] == "nan" and 0 <= float(rows[2]["client_saturated"]) <= 1


def test_the_coordinate_trace_follows_the_runs_server_model(tmp_path):
    """simulations/trace_coordinate.py: the server mean it reports after the last round is the run's."""
    import trace_coordinate

    toml, _, mean = _digits_run(tmp_path)
    index = int(np.abs(mean).argmax())
    out = tmp_path / "trace.csv"
    assert trace_coordinate.main([str(toml), "--index", str(index), "--out", str(out)]) == 0
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["client"] for r in rows if r["round"] == "3"] == ["0", "1", "2"]
    assert float(rows[-1]["server_mean"]) == pytest.approx(float(mean[index]), rel=1e-5)
