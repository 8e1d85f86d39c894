"""`fedvb run`: exit code 2 and one line naming the field on bad input; the run folder on success."""

import json
import tomllib

import numpy as np
import pytest
import torch

from fedvb.cli import main
from fedvb.config import RunConfig
from fedvb.experiment import resolve_device

SMALL = ["--dataset", "synthetic-logistic", "--model", "softmax", "--num-clients", "5", "--rounds", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "fedsgd"], "strategy: got 'fedsgd'; allowed: 'fedavg'"),
        (["--set", "rho=0"], "rho: must be > 0, got 0.0"),
        (["--set", "damping=1.5"], "damping: must be <= 1, got 1.5"),
        (["--set", "lr=fast"], "lr: expected float, got 'fast'"),
        (["--num-clients", "0"], "num_clients: must be >= 1, got 0"),
        (["--set", "fraction_train=0"], "fraction_train: must be > 0, got 0.0"),
        (["--set", "colour=red"], "colour: unknown key; allowed: strategy"),
        (["--set", "novalue"], "--set: expected KEY=VALUE, got 'novalue'"),
        (["--backend", "slurm"], "backend: got 'slurm'; allowed: 'inprocess', 'ray'"),
        (["--dataset", "emnist"], "dataset: got 'emnist'; allowed: fashion-mnist"),
        (["--set", "partition=random"], "partition: got 'random'; allowed: iid"),
        (["--set", "hidden=200,x"], "hidden: comma-separated positive integers"),
        (["--dataset", "uci-heart", "--num-clients", "7"], "num_clients: the data has 4 natural clients, got 7"),
        (["--strategy", "bayes-admm-newton", "--set", "solver=ivon"], "solver: bayes-admm-newton (dense family)"),
        (["--data", "/nonexistent.npz", "--model", "linear"], "data: cannot read /nonexistent.npz"),
        (["--data", "x.npz", "--model", "mlp"], "model: --data needs --model linear or logreg"),
        (["/nonexistent.toml"], "config: file not found: /nonexistent.toml"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedvb: error: ")
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written before validation passed


def test_bring_your_own_npz_errors_name_the_array(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 2)), y=np.zeros(6))
    assert main(["run", "--data", str(tmp_path / "d.npz"), "--model", "linear", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "data: " in err and "lacks the array 'client'" in err


def test_a_run_writes_its_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--strategy", "fedlap-cov", "--set", "lr=0.02", "--out", str(out), "--quiet"]) == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert RunConfig.from_mapping(saved).strategy == "fedlap-cov" and saved["rounds"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["round"] == 2 and summary["strategy"] == "fedlap-cov" and summary["total_time_s"] > 0
    with np.load(out / "posterior.npz") as z:
        assert z["mean"].shape == z["precision"].shape == (12,) and (z["precision"] > 0).all()
    assert "finished" in capsys.readouterr().out


def test_help_lists_every_configuration_key(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for key in RunConfig.__dataclass_fields__:
        assert f"  {key} " in text


def test_device_choice_lives_in_one_place():
    assert resolve_device(RunConfig(device="cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(RunConfig(device="auto")).type == expected
