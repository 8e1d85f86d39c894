"""Run pictures, ``fedvb compare`` and ``fedvb sweep``: each output written, non-empty, and numerically right."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedvb.backends import run
from fedvb.cli import main
from fedvb.config import RunConfig
from fedvb.records import to_array_record

SMALL = dict(dataset="synthetic-logistic", model="softmax", num_clients=5, rounds=3, lr=0.01, eval_samples=8)


def assert_picture(path: Path, min_size=(300, 300)) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # something is drawn, not a blank canvas


def test_every_run_draws_its_pictures(tmp_path):
    run(RunConfig.from_mapping({**SMALL, "strategy": "fedlap-cov", "out": str(tmp_path / "run")}))
    for name in ("labels.png", "curves.png", "reliability.png"):
        assert_picture(tmp_path / "run" / name)
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_regression_runs_draw_curves_but_no_reliability_diagram(tmp_path):
    config = dict(dataset="synthetic-linear", model="linear", num_clients=4, rounds=2, strategy="fedavg")
    run(RunConfig.from_mapping({**config, "out": str(tmp_path / "run")}))
    assert_picture(tmp_path / "run" / "curves.png")
    assert not (tmp_path / "run" / "reliability.png").exists()


def summaries(folders) -> list[dict]:
    return [json.loads((Path(f) / "summary.json").read_text()) for f in folders]


def test_compare_pools_seeds_into_mean_and_sample_std(tmp_path, capsys):
    folders = []
    for strategy, seed in (("fedavg", 0), ("fedavg", 1), ("fedavg", 2), ("ivon-admm", 0)):
        out = tmp_path / f"{strategy}-{seed}"
        run(RunConfig.from_mapping({**SMALL, "strategy": strategy, "seed": seed, "out": str(out)}))
        folders.append(out)
    assert main(["compare", *map(str, folders), "--out", str(tmp_path / "cmp")]) == 0
    table = {row["setting"]: row for row in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    accuracies = [s["accuracy"] for s in summaries(folders[:3])]
    assert table["fedavg"]["runs"] == "3"
    assert float(table["fedavg"]["accuracy_mean"]) == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert float(table["fedavg"]["accuracy_std"]) == pytest.approx(np.std(accuracies, ddof=1), abs=1e-12)
    assert table["ivon-admm"]["predictive_nll_mean"] != "" and table["fedavg"]["predictive_nll_mean"] == ""
    rows = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in folders[:3]]
    last3 = [np.mean([r["accuracy"] for r in run_rows[-3:]]) for run_rows in rows]  # the papers' report
    assert float(table["fedavg"]["accuracy_last3_mean"]) == pytest.approx(np.mean(last3), abs=1e-12)
    per_round = [np.mean([r["wall_time_s"] for r in run_rows]) for run_rows in rows]
    assert float(table["fedavg"]["s_per_round_mean"]) == pytest.approx(np.mean(per_round), abs=1e-12)
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert markdown.startswith("| setting | n |") and "| fedavg | 3 |" in markdown
    assert markdown in capsys.readouterr().out
    assert_picture(tmp_path / "cmp" / "compare.png")


def test_compare_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert f"runs: {tmp_path} is not a finished run folder" in capsys.readouterr().err


def test_sweep_runs_the_grid_then_compares(tmp_path):
    sets = [f"--set={k}={v}" for k, v in {**SMALL, "target_accuracy": 0.5}.items()]
    out = tmp_path / "sweep"
    assert main(["sweep", "--strategies", "fedavg,fedlap-cov", "--seeds", "0,1", *sets, "--out", str(out)]) == 0
    folders = sorted(out.glob("*/seed*"))
    assert [f.relative_to(out).as_posix() for f in folders] == [
        "fedavg/seed0", "fedavg/seed1", "fedlap-cov/seed0", "fedlap-cov/seed1"]  # fmt: skip
    seeds = [RunConfig.from_sources(f / "config.toml").seed for f in folders]
    assert seeds == [0, 1, 0, 1]
    table = {row["setting"]: row for row in csv.DictReader(open(out / "compare.csv"))}
    assert set(table) == {"fedavg", "fedlap-cov"} and table["fedavg"]["reached_target"].endswith("/2")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategies", "fedsgd"], "strategies: got ['fedsgd']; allowed: fedavg"),
        (["--strategies", "fedavg", "--seeds", "0,x"], "seeds: comma-separated integers, got '0,x'"),
        (["--strategies", "fedavg", "--set", "rho=-1"], "rho: must be > 0, got -1.0"),
    ],
)
def test_sweep_rejects_bad_input_before_running(args, message, tmp_path, capsys):
    assert main(["sweep", *args, "--out", str(tmp_path / "sweep")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_jsonl_output_is_one_row_per_round_then_the_summary(tmp_path, capsys):
    args = [f"--set={k}={v}" for k, v in SMALL.items()]
    assert main(["run", *args, "--strategy", "fedavg", "--output", "jsonl", "--out", str(tmp_path / "r")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["round"] for r in lines[:-1]] == [1, 2, 3] and set(lines[-1]) == {"summary"}
    assert lines[:-1] == [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]


def test_bar_output_ends_with_the_summary_table(tmp_path, capsys):
    args = [f"--set={k}={v}" for k, v in SMALL.items()]
    assert main(["run", *args, "--strategy", "fedavg", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "fedvb summary" in out and "accuracy" in out and out.rstrip().endswith(str(tmp_path / "r"))


def test_a_stopped_run_exits_1_and_says_how_to_resume(tmp_path, capsys):
    args = [f"--set={k}={v}" for k, v in SMALL.items()]
    out = str(tmp_path / "r")
    assert main(["run", *args, "--strategy", "fedavg", "--set", "faults=raise=1.0", "--quiet", "--out", out]) == 1
    assert f"continue with: fedvb run --resume {out}" in capsys.readouterr().err


def test_bytes_and_rounds_to_target_are_what_was_sent_and_reached(tmp_path):
    config = RunConfig.from_mapping({**SMALL, "strategy": "ivon-admm", "target_accuracy": 0.7, "out": str(tmp_path)})
    run(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dim = len(np.load(tmp_path / "posterior.npz")["mean"])
    # down: mean, precision (float64) and the round counter to each of 5 clients; up: mean and precision from
    # each, no site (the server computes the sites), in float32: the float32 model's posterior, which float32
    # holds exactly (fedvb.records.narrowed)
    vector = torch.zeros(dim, dtype=torch.float64)
    down = to_array_record({"mean": vector, "precision": vector, "round": torch.tensor(0.0, dtype=torch.float64)})
    up = to_array_record({"mean": vector.float(), "precision": vector.float()})
    for row in rows:
        assert row["bytes_down"] == 5 * down.count_bytes()
        assert row["bytes_up"] == 5 * up.count_bytes()
    summary = json.loads((tmp_path / "summary.json").read_text())
    reached = [r["round"] for r in rows if r["accuracy"] >= 0.7]
    assert summary["rounds_to_target"] == (reached[0] if reached else None)
    assert summary["bytes_total"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)


def test_a_run_made_before_a_key_existed_compares_as_the_same_setting(tmp_path):
    from fedvb.compare import load_run

    config = RunConfig(strategy="fedlap", num_clients=4, out=str(tmp_path / "old"))
    folder = tmp_path / "old"
    folder.mkdir()
    lines = config.to_toml().splitlines()
    saved = "\n".join(line for line in lines if not line.startswith(("weight_decay", "damping")))
    (folder / "config.toml").write_text(saved)
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"round": 1, "accuracy": 0.5}))
    loaded = load_run(folder).config
    assert loaded["weight_decay"] == 0.0 and loaded["damping"] == 0.25  # fedlap's 1/K at K = 4


def test_compare_names_a_setting_by_the_keys_that_tell_settings_apart(tmp_path):
    """A key only one setting reads (fedlap-func's func_lr beside a FedAvg run saved with another default of it)
    names nothing; the same key differing between two settings that read it names both."""
    from fedvb.compare import _labels

    def setting(**values):
        return tuple(sorted(RunConfig(num_clients=4, out=str(tmp_path), **values).as_dict().items()))

    apart = {setting(strategy="fedavg", func_lr=0.001, lr=1e-3): [], setting(strategy="fedlap-func", lr=1e-3): []}
    assert _labels(apart) == ["fedavg", "fedlap-func"]
    two = {setting(strategy="fedlap-func", func_lr=0.5): [], setting(strategy="fedlap-func"): []}
    assert _labels(two) == ["fedlap-func (func_lr=0.5)", "fedlap-func (func_lr=1.0)"]
    mixed = {setting(strategy="ivon-admm", weight_decay=0.0): [], setting(strategy="feddyn", weight_decay=1e-6): []}
    assert _labels(mixed) == ["ivon-admm", "feddyn"]  # IVON's clients take no weight decay: nothing tells them apart


def test_compare_pools_runs_that_differ_only_in_keys_their_strategy_does_not_read(tmp_path):
    """FedDyn runs saved under two defaults of fedlap-func's func_lr compute the same thing: one setting of n = 2
    (until 2026-12-07 they made two settings of one name, and the table kept one of them); FedDyn runs of
    another alpha stay a setting of their own, named by it."""
    from fedvb.compare import compare_runs

    folders = []
    for name, values in (
        ("a", dict(seed=1, func_lr=0.001)),
        ("b", dict(seed=2)),
        ("c", dict(seed=1, feddyn_alpha=0.1)),
    ):
        folders.append(tmp_path / name)
        run(RunConfig.from_mapping({**SMALL, "strategy": "feddyn", "out": str(folders[-1]), **values}))
    markdown = compare_runs(folders, tmp_path / "compare")
    rows = [line for line in markdown.splitlines() if line.startswith("| feddyn")]
    assert [row.split(" | ")[:2] for row in rows[:2]] == [["| feddyn (feddyn_alpha=0.01)", "2"],
                                                          ["| feddyn (feddyn_alpha=0.1)", "1"]]  # fmt: skip
