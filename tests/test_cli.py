"""`fedvb run`: exit code 2 and one line naming the field on bad input; the run folder on success."""

import dataclasses
import io
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvb.cli import main
from fedvb.config import RunConfig
from fedvb.experiment import resolve_device
from tests.marks import needs_data

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic-logistic", "--model", "softmax", "--num-clients", "5", "--rounds", "2"]


# Bring-your-own data files for the table below: name -> arrays (x is (N, d), y (N,), client (N,)).
RNG = np.random.default_rng(0)
X, Y, CLIENT = RNG.standard_normal((12, 2)), RNG.integers(0, 3, 12), np.repeat([0, 1, 2], 4)
NPZ = {
    "good": dict(x=X, y=Y, client=CLIENT),
    "no-client": dict(x=X, y=Y),
    "short-y": dict(x=X, y=Y[:-1], client=CLIENT),
    "nan-x": dict(x=np.where(np.eye(12, 2) > 0, np.nan, X), y=Y, client=CLIENT),
    "inf-y": dict(x=X, y=np.where(np.arange(12) == 3, np.inf, Y.astype(float)), client=CLIENT),
    "negative-label": dict(x=X, y=Y - 1, client=CLIENT),
    "float-label": dict(x=X, y=Y + 0.5, client=CLIENT),
    "test-label-out-of-range": dict(x=X, y=Y, client=CLIENT, x_test=X[:3], y_test=np.array([0, 1, 7])),
    "test-width": dict(x=X, y=Y, client=CLIENT, x_test=X[:3, :1], y_test=Y[:3]),
    "x-vector": dict(x=X[:, 0], y=Y, client=CLIENT),
    "no-columns": dict(x=X[:, :0], y=Y, client=CLIENT),
    "no-rows": dict(x=X[:0], y=Y[:0], client=CLIENT[:0]),
    "complex-x": dict(x=X + 1j, y=Y, client=CLIENT),
    "string-y": dict(x=X, y=Y.astype(str), client=CLIENT),
    "matrix-y": dict(x=X, y=np.stack([Y, Y], 1), client=CLIENT),
    "matrix-client": dict(x=X, y=Y, client=np.stack([CLIENT, CLIENT], 1)),
    "huge-label": dict(x=X, y=np.where(np.arange(12) == 0, 10**9, Y), client=CLIENT),
    "nan-x-test": dict(x=X, y=Y, client=CLIENT, x_test=np.full((2, 2), np.nan), y_test=Y[:2]),
    "short-y-test": dict(x=X, y=Y, client=CLIENT, x_test=X[:3], y_test=Y[:2]),
    "empty-npz": {},
}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# files that are not an .npz at all (written as raw bytes)
RAW = {
    "npy": npy_bytes(X),
    "empty-file": b"",
    "text": b"x,y,client\n1,2,0\n",
    "truncated": b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
}
NPZ_RUN = ["--model", "logreg", "--num-clients", "3", "--data"]
# every float key refuses inf and nan
NON_FINITE = (
    ("lr", "inf"), ("rho", "inf"), ("temperature", "inf"), ("ivon_hess_init", "inf"), ("prior_precision", "inf"),
    ("damping", "nan"), ("alpha", "nan"), ("proximal_mu", "inf"), ("feddyn_alpha", "inf"), ("admm_rho", "nan"),
    ("server_lr", "inf"), ("func_lr", "inf"), ("func_weight", "nan"), ("client_timeout_s", "inf"),
    ("data_fraction", "nan"), ("robust_clip", "inf"), ("target_accuracy", "nan"), ("partition_alpha", "inf"),
    ("precision_floor", "inf"), ("ivon_beta2", "nan"), ("client_cpus", "inf"), ("local_test_fraction", "nan"),
)  # fmt: skip

BAD_INPUTS = [
    (["--strategy", "fedsgd"], "strategy: got 'fedsgd'; allowed: 'fedavg'"),
    (["--set", "rho=-1"], "rho: must be > 0, got -1.0"),  # 0: the strategy's default
    (["--set", "damping=1.5"], "damping: must be <= 1, got 1.5"),
    (["--set", "damping=-0.5"], "damping: must be > 0, got -0.5"),
    (["--set", "alpha=1.5"], "alpha: must be <= 1, got 1.5"),
    (["--set", "lr=fast"], "lr: expected float, got 'fast'"),
    (["--set", "lr=-0.1"], "lr: must be > 0, got -0.1"),
    (["--set", "prior_precision=-1"], "prior_precision: must be > 0, got -1.0"),
    (["--num-clients", "0"], "num_clients: must be >= 1, got 0"),
    (["--rounds", "0"], "rounds: must be >= 1, got 0"),
    (["--set", "rounds=2.5"], "rounds: expected int, got '2.5'"),
    (["--set", "batch_size=-1"], "batch_size: must be >= 1, got -1"),
    (["--set", "fraction_train=0"], "fraction_train: must be > 0, got 0.0"),
    (["--set", "data_fraction=1.5"], "data_fraction: must be <= 1, got 1.5"),
    (["--set", "local_test_fraction=1"], "local_test_fraction: must be < 1, got 1.0"),
    (["--set", "local_test_fraction=-0.5"], "local_test_fraction: must be -1 (automatic) or in [0, 1)"),
    (["--set", "partition=iid", "--set", "partition_alpha=0.3"], "partition_alpha: partition 'iid' has no Dirichlet"),
    (["--set", "partition_alpha=-1"], "partition_alpha: must be >= 0"),
    (["--set", "log=csv"], "log: got 'csv'; allowed:"),
    (["--set", "eval_samples=-3"], "eval_samples: must be >= 0, got -3"),
    (["--set", "colour=red"], "colour: unknown key; allowed: strategy"),
    (["--set", "novalue"], "--set: expected KEY=VALUE, got 'novalue'"),
    (["--backend", "slurm"], "backend: got 'slurm'; allowed: 'inprocess', 'ray'"),
    (["--set", "device=tpu"], "device: got 'tpu'; allowed: cpu, cuda, cuda:N, auto"),
    (["--dataset", "emnist"], "dataset: got 'emnist'; allowed: fashion-mnist"),
    (["--model", "vgg"], "model: got 'vgg'; allowed: softmax"),
    (["--set", "partition=random"], "partition: got 'random'; allowed: auto, iid"),
    (["--set", "hidden=200,x"], "hidden: comma-separated positive integers"),
    (["--set", "activation=swish"], "activation: got 'swish'; allowed:"),
    (["--dataset", "uci-heart", "--num-clients", "7"], "num_clients: the data has 4 natural clients, got 7"),
    (
        ["--dataset", "digits", "--set", "partition=iid", "--num-clients", "2000"],
        "num_clients: 2000 clients for 1438 training rows",
    ),  # fmt: skip
    (
        ["--strategy", "bayes-admm-newton", "--set", "solver=ivon"],
        "solver: bayes-admm-newton allows the solvers exact, not 'ivon'",
    ),
    (
        ["--strategy", "fedlap-func", "--dataset", "synthetic-logistic", "--set", "func_inputs=100000"],
        "func_inputs: must be <",
    ),
    (["--set", "min_replies=11"], "min_replies: must be <= the 10 clients sampled per round, got 11"),
    (["--set", "round_retries=-1"], "round_retries: must be >= 0, got -1"),
    (["--set", "client_timeout_s=-1"], "client_timeout_s: must be >= 0, got -1.0"),
    (["--set", "target_accuracy=2"], "target_accuracy: must be <= 1, got 2.0"),
    (["--set", "faults=melt=0.1"], "faults: unknown fault 'melt'; allowed: raise, timeout"),
    (["--set", "faults=nan=0.7,inf=0.7"], "faults: fractions add up to 1.4; at most 1"),
    (["--set", "faults=timeout=0.1"], "faults: timeout faults need client_timeout_s > 0"),
    (["--strategy", "fedavg", "--set", "faults=negative-precision=0.1"], "faults: negative-precision needs"),
    (["--data", "/nonexistent.npz", "--model", "linear"], "data: cannot read /nonexistent.npz"),
    (["--data", "x.npz", "--model", "softmax"], "model: --data needs --model linear (a regression) or a classifier"),
    (["/nonexistent.toml"], "config: file not found: /nonexistent.toml"),
    ([*NPZ_RUN, "{no-client}"], "data: {no-client} lacks the array 'client'"),
    ([*NPZ_RUN, "{short-y}"], "data: x must be (N, d) or (N, C, H, W) with y and client of length N"),
    ([*NPZ_RUN, "{x-vector}"], "data: x must be (N, d)"),
    ([*NPZ_RUN, "{nan-x}"], "data: x has non-finite values"),
    (["--model", "linear", "--num-clients", "3", "--data", "{inf-y}"], "data: y has non-finite values"),
    ([*NPZ_RUN, "{negative-label}"], "data: y must hold non-negative integer classes"),
    ([*NPZ_RUN, "{float-label}"], "data: y must hold non-negative integer classes"),
    ([*NPZ_RUN, "{test-label-out-of-range}"], "data: y_test must hold integer classes in 0..2"),
    ([*NPZ_RUN, "{test-width}"], "data: x_test must be (M, 2)"),
    (["--model", "logreg", "--num-clients", "4", "--data", "{good}"], "num_clients: {good} has 3 clients"),
    # data files that are broken or not data
    ([*NPZ_RUN, "{no-columns}"], "data: x has no columns"),
    ([*NPZ_RUN, "{no-rows}"], "data: x has no rows"),
    ([*NPZ_RUN, "{complex-x}"], "data: x must hold real numbers, got dtype complex128"),
    ([*NPZ_RUN, "{string-y}"], "data: y must hold real numbers"),
    ([*NPZ_RUN, "{matrix-y}"], "data: y must be one-dimensional, got shape (12, 2)"),
    ([*NPZ_RUN, "{matrix-client}"], "data: client must be one-dimensional"),
    ([*NPZ_RUN, "{huge-label}"], "data: y's largest class is 1000000000, far beyond its 12 rows"),
    ([*NPZ_RUN, "{nan-x-test}"], "data: x_test has non-finite values"),
    ([*NPZ_RUN, "{short-y-test}"], "data: x_test must be (M, 2) with y_test of length M"),
    ([*NPZ_RUN, "{empty-npz}"], "data: {empty-npz} lacks the array 'x' (has nothing)"),
    ([*NPZ_RUN, "{npy}"], "data: {npy} is a single .npy array"),
    ([*NPZ_RUN, "{empty-file}"], "data: cannot read {empty-file}: EOFError"),
    ([*NPZ_RUN, "{text}"], "data: cannot read {text}"),
    ([*NPZ_RUN, "{truncated}"], "data: cannot read {truncated}"),
    (
        ["--data", "{good}", "--model", "zenke-cnn", "--num-clients", "3"],
        "zenke-cnn needs image inputs (C, H, W), got shape (2,)",
    ),
    # numbers that are not finite
    *[(["--set", f"{key}={value}"], f"{key}: must be a finite number, got {value}") for key, value in NON_FINITE],
    (["--set", "robust_clip=-1"], "robust_clip: must be >= 0, got -1.0"),
    (["--set", "combine=average"], "combine: got 'average'; allowed: 'mean', 'trimmed', 'median'"),
    (["--set", "combine_trim=0.5"], "combine_trim: must be < 0.5, got 0.5"),
    (["--set", "strategy=bayes-admm-newton", "--set", "combine=median"], "combine: median combines precisions"),
    (
        ["--strategy", "fedlap-kfac", "--set", "combine=trimmed"],
        "combine: trimmed combines precisions entry by entry, "
        "which need not keep a kronecker one positive definite; allowed with a kronecker family: 'mean'",
    ),
    (["--strategy", "fedlap-kfac", "--set", "solver=ivon"], "solver: fedlap-kfac allows the solvers exact, laplace"),
    (["--set", "engine=vectorised", "--set", "client_timeout_s=2"], "engine: vectorised trains a cohort in one step"),
    (["--set", "engine=batched"], "engine: got 'batched'; allowed: 'loop', 'vectorised'"),
    (["--set", "cohort_chunk=-1"], "cohort_chunk: must be >= 0, got -1"),
    (["--set", "ivon_beta2=1"], "ivon_beta2: must be < 1, got 1.0"),
    (["--set", "ivon_mc_samples=0"], "ivon_mc_samples: must be >= 1, got 0"),
    (["--set", "ivon_kernel=gpu"], "ivon_kernel: got 'gpu'; allowed: 'auto', 'torch', 'native'"),
    (["--set", "func_steps=-1"], "func_steps: must be >= 0, got -1"),
    (["--set", "optimizer=lbfgs"], "optimizer: got 'lbfgs'; allowed: '', 'adam', 'sgd'"),
    (["--set", "family=kronecker"], "family: got 'kronecker'; allowed: '', 'isotropic'"),
    (["--set", "preprocessing=whiten"], "preprocessing: got 'whiten'; allowed: 'standardize', 'raw'"),
    (["--set", "seed=-1"], "seed: must be >= 0, got -1"),
    (["--set", "local_epochs=-2"], "local_epochs: must be >= 1, got -2"),
    (["--set", "client_gpus=-1"], "client_gpus: must be >= 0, got -1.0"),
    (
        ["--strategy", "ivon-admm", "--set", "solver=laplace"],
        "solver: ivon-admm allows the solvers ivon, not 'laplace'",
    ),
    (["--strategy", "pvi", "--set", "family=dense", "--set", "solver=ivon"], "solver: ivon cannot serve the dense"),
    (["--strategy", "fedlap", "--set", "family=dense"], "family: fedlap has the isotropic family"),
    # models, devices and data that cannot work together
    (["--dataset", "synthetic-logistic", "--model", "zenke-cnn"], "model: zenke-cnn needs image inputs"),
    (["--dataset", "digits", "--model", "acar-cnn"], "model: acar-cnn needs images of at least 16x16 pixels"),
    (["--set", "weight_decay=inf"], "weight_decay: must be a finite number, got inf"),
    (["--set", "grad_clip=-1"], "grad_clip: must be >= 0, got -1.0"),
    (["--set", "optimizer_state=warm"], "optimizer_state: got 'warm'; allowed: 'fresh', 'kept'"),
    (["--set", "class_counts=3*5"], "class_counts: is given with partition 'class-counts' and only with it"),
    (["--set", "partition=class-counts", "--set", "class_counts=3*2; x"], "class_counts: expected counts like"),
    (["--dataset", "synthetic-logistic", "--model", "resnet20"], "model: resnet20"),
    (["--set", "device=cuda"], "device: cuda asked for, but this machine has"),
    (["--set", "device=cuda:3"], "device: cuda:3 asked for"),
]


NEEDS_DATA = {"uci-heart": needs_data("uci-heart")}  # the cases on a dataset read from files


@pytest.mark.parametrize(
    "args, message",
    [pytest.param(a, m, marks=[NEEDS_DATA[d] for d in NEEDS_DATA if d in a]) for a, m in BAD_INPUTS],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    paths = {name: str(tmp_path / f"{name}.npz") for name in (*NPZ, *RAW)}
    for name, arrays in NPZ.items():
        np.savez(paths[name], **arrays)
    for name, raw in RAW.items():
        Path(paths[name]).write_bytes(raw)
    args = [a.format_map(paths) if a.startswith("{") else a for a in args]
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedvb: error: ")
    assert message.format_map(paths) in err
    assert not (tmp_path / "run").exists()  # nothing written before validation passed


def test_the_bad_input_table_is_large_enough():
    assert len(BAD_INPUTS) >= 100 and len({m for _, m in BAD_INPUTS}) == len(BAD_INPUTS) - 1  # one repeat


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


@pytest.mark.parametrize(("model", "shape"), [("mlp", (6,)), ("zenke-cnn", (3, 16, 16))])
def test_your_own_data_trains_any_classifier_on_its_own_clients(model, shape, tmp_path):
    """A split made elsewhere (its own client column) fed to the MLP and to a CNN, images as (N, C, H, W)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = (rng.standard_normal((240, *shape)) + 2.0 * y.reshape(-1, *[1] * len(shape))).astype(np.float32)
    client = np.repeat(np.arange(3), 80)  # the file's own split: clients 0, 1, 2 by row blocks
    np.savez(tmp_path / "own.npz", x=x[:180], y=y[:180], client=client[:180], x_test=x[180:], y_test=y[180:])
    out = tmp_path / "run"
    args = ["run", "--data", str(tmp_path / "own.npz"), "--model", model, "--num-clients", "3", "--strategy",
            "fedavg", "--rounds", "2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["accuracy"] > 0.5, summary  # chance: 1/3
    with np.load(out / "posterior.npz") as z:
        assert z["mean"].size > 3 * int(np.prod(shape))  # the model asked for, not the linear one


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


def out_cases(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return [
        ("", "out: is empty"),
        (str(tmp_path / "a-file"), f"out: {tmp_path / 'a-file'} is a file, not a folder"),
        (str(tmp_path / "a-file" / "run"), f"out: {tmp_path / 'a-file'} is a file, so"),
    ]


@pytest.mark.parametrize("case", range(3))
def test_an_unusable_out_folder_exits_2_before_anything_runs(case, tmp_path, capsys):
    out, message = out_cases(tmp_path)[case]
    assert main(["run", *SMALL, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written


@pytest.mark.parametrize(
    "checkpoint", [b"", b"not a checkpoint", b"PK\x03\x04truncated"], ids=["empty", "garbage", "truncated-zip"]
)
def test_a_broken_checkpoint_is_refused_with_one_line(checkpoint, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.toml").write_text(RunConfig(dataset="synthetic-logistic", out=str(folder)).to_toml())
    (folder / "checkpoint.pt").write_bytes(checkpoint)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "resume: " in err and "is not a readable fedvb checkpoint" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_config_path_that_is_a_folder_is_refused(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert f"config: {tmp_path} is a directory, not a TOML file" in capsys.readouterr().err


def test_flwr_run_config_lists_every_key_with_its_default():
    """Flower accepts in --run-config only the keys of [tool.flwr.app.config]: all of fedvb's, as defaults."""
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}  # as written: "per strategy" values too
    assert set(app_config) == set(defaults)
    assert {k: v for k, v in app_config.items() if k != "out"} == {k: v for k, v in defaults.items() if k != "out"}
    assert app_config["out"] == "runs/flwr/{run_id}"


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out), "--quiet"]) == 0
    config = (out / "config.toml").read_text()
    (out / "config.toml").write_text(config.replace('strategy = "ivon-admm"', 'strategy = "fedavg"'))
    assert main(["run", "--resume", str(out), "--rounds", "3"]) == 2
    assert "was written under another configuration" in capsys.readouterr().err


def test_an_attack_spec_is_checked_at_the_door(capsys, tmp_path):
    cases = (("melt@0", "attack: unknown attack 'melt'"), ("huge@9", "clients must be < num_clients"),
             ("huge@x", "expected KIND@CLIENTS[:once]"), ("huge@0:twice", "expected KIND@CLIENTS"))  # fmt: skip
    for spec, message in cases:
        assert main(["run", *SMALL, "--set", f"attack={spec}", "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_scheduled_run_cannot_be_resumed_over_other_rounds(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--set", "lr_schedule=cosine", "--out", str(out), "--quiet"]) == 0
    assert main(["run", "--resume", str(out), "--rounds", "5"]) == 2
    assert "lr_schedule 'cosine' runs over the" in capsys.readouterr().err


def _crafted(checkpoint: dict, folder: Path, case: str) -> None:
    """Edit a finished run's checkpoint (and client rows) as a sender of a run folder could."""
    strategy, store = checkpoint["strategy"], checkpoint["strategy"]["client_store"]
    layout, slots = store["layout"], store["slots"]
    if case == "state-name-leaves-the-folder":
        layout["../../x"], slots["../../x"] = layout.pop("site_linear"), slots.pop("site_linear")
    elif case == "dtype-not-a-dtype":
        layout["site_linear"]["dtype"] = "load"
    elif case == "negative-shape":
        layout["site_linear"]["shape"] = [-1]
    elif case == "site-shape-not-the-model":
        layout["site_linear"]["shape"] = [3]
        (folder / "clients" / "site_linear.bin").write_bytes(bytes(2 * 5 * 3 * 8))
    elif case == "momentum-shape-not-the-model":
        layout["ivon_momentum"]["shape"] = [7]
        (folder / "clients" / "ivon_momentum.bin").write_bytes(bytes(2 * 5 * 7 * 4))
    elif case == "slots-of-another-federation":
        slots["site_linear"] = torch.zeros(9, dtype=torch.int8)
    elif case == "slot-out-of-range":
        slots["site_linear"] = torch.full((5,), 5, dtype=torch.int8)
    elif case == "store-folder-outside":
        store["folder"] = "../elsewhere"
    elif case == "store-of-more-clients":
        store["num_clients"] = 7
    elif case == "rows-truncated":
        path = folder / "clients" / "site_quadratic.bin"
        path.write_bytes(path.read_bytes()[:-8])
    elif case == "rows-missing":
        (folder / "clients" / "site_quadratic.bin").unlink()
    elif case == "unknown-store-kind":
        store["kind"] = "pickle"
    elif case == "store-not-a-table":
        strategy["client_store"] = [1, 2]
    elif case == "memory-store-names-other-clients":
        strategy["client_store"] = {"kind": "memory", "states": {99: {"site_linear": torch.zeros(12)}}}
    elif case == "memory-store-site-not-the-model":
        strategy["client_store"] = {"kind": "memory", "states": {1: {"site_linear": torch.zeros(3)}}}
    elif case == "server-array-missing":
        del strategy["arrays"]["precision"]
    elif case == "server-array-wrong-shape":
        strategy["arrays"]["mean"] = torch.zeros(4, dtype=torch.float64)
    elif case == "server-array-wrong-dtype":
        strategy["arrays"]["mean"] = strategy["arrays"]["mean"].float()
    elif case == "server-array-not-finite":
        strategy["arrays"]["precision"] = torch.full_like(strategy["arrays"]["precision"], float("inf"))
    elif case == "rows-not-the-rounds":
        checkpoint["rows"] = checkpoint["rows"][:1]
    elif case == "round-not-a-number":
        checkpoint["round"] = "2"
    else:
        raise AssertionError(case)


CRAFTED = (
    "state-name-leaves-the-folder", "dtype-not-a-dtype", "negative-shape", "site-shape-not-the-model",
    "momentum-shape-not-the-model", "slots-of-another-federation", "slot-out-of-range", "store-folder-outside",
    "store-of-more-clients", "rows-truncated", "rows-missing", "unknown-store-kind", "store-not-a-table",
    "memory-store-names-other-clients", "memory-store-site-not-the-model", "server-array-missing",
    "server-array-wrong-shape", "server-array-wrong-dtype", "server-array-not-finite", "rows-not-the-rounds",
    "round-not-a-number",
)  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *SMALL, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_checkpoint_or_client_store_is_refused_with_one_line(case, finished_run, tmp_path, capsys):
    """A received run folder whose checkpoint (fingerprint intact) or client rows were edited: exit 2, one
    line naming ``resume``, the folder as it was, nothing trained."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    _crafted(checkpoint, folder, case)
    torch.save(checkpoint, folder / "checkpoint.pt")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", "--resume", str(folder), "--rounds", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedvb: error: resume: "), err
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_an_untouched_copy_of_the_run_folder_resumes(finished_run, tmp_path):
    """The checks above refuse only what was edited: the same folder, copied as it is, resumes."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    assert main(["run", "--resume", str(folder), "--rounds", "3", "--quiet"]) == 0
    assert [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
