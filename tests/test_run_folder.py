"""What a run folder records beside the metrics: provenance, metrics.csv, TensorBoard events; what the live
display shows at 80 columns; partitions, your own data and the pictures at any number of clients."""

import csv
import io
import json
import re
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import fedvb
from fedvb.backends import run
from fedvb.config import ConfigError, RunConfig
from fedvb.core import ivon_native
from fedvb.data import plot_label_distribution
from fedvb.experiment import prepare
from fedvb.progress import RunDisplay, SweepDisplay

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="synthetic-logistic", model="softmax", num_clients=4, rounds=3, lr=0.01, eval_samples=4)


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_config_toml_records_versions_and_commit_and_still_reads_back(tmp_path):
    run(RunConfig.from_mapping({**SMALL, "strategy": "fedavg", "out": str(tmp_path)}))
    saved = tomllib.loads((tmp_path / "config.toml").read_text())
    recorded = saved["provenance"]
    assert recorded["fedvb"] == fedvb.__version__ and recorded["torch"] == torch.__version__
    assert recorded["flwr"].startswith("1.42") and re.fullmatch(r"3\.\d+\.\d+", recorded["python"])
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit, marked dirty when it has uncommitted changes
        assert recorded["commit"].removesuffix("-dirty") == head.stdout.strip()
    assert RunConfig.from_sources(tmp_path / "config.toml").strategy == "fedavg"  # provenance is not a key


def test_metrics_csv_holds_the_rows_of_metrics_jsonl(tmp_path):
    run(RunConfig.from_mapping({**SMALL, "strategy": "ivon-admm", "faults": "nan=0.5", "out": str(tmp_path)}))
    rows = rows_of(tmp_path)
    table = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(table) == len(rows) == 3
    for row, line in zip(rows, table):
        assert int(line["round"]) == row["round"] and int(line["rejected"]) == len(row["rejected"])
        for key in ("accuracy", "nll", "predictive_ece", "bytes_up", "elapsed_s"):
            assert float(line[key]) == pytest.approx(row[key], rel=1e-12)
    assert sum(int(line["rejected"]) for line in table) > 0


def test_tensorboard_events_read_back_as_the_rounds_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(RunConfig.from_mapping({**SMALL, "strategy": "ivon-admm", "log": "tensorboard", "out": str(tmp_path)}))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = rows_of(tmp_path)
    for key in ("accuracy", "nll", "predictive_accuracy", "bytes_down", "rejected"):
        scalars = events.Scalars(key)
        expected = [len(r[key]) if key == "rejected" else r[key] for r in rows]
        assert [s.step for s in scalars] == [1, 2, 3]
        np.testing.assert_allclose([s.value for s in scalars], expected, rtol=1e-6)


def render(display_events, *, width: int, make) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, color_system=None)
    display = make(console)
    for event in display_events:
        display(event)
    display._bar.progress.refresh()
    display._bar.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())  # cursor and colour codes
    return [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]


ROW = {"round": 3, "accuracy": 0.9331, "nll": 0.2104, "ece": 0.0412, "predictive_accuracy": 0.9333,
       "predictive_nll": 0.2015, "wall_time_s": 1.0, "rejected": []}  # fmt: skip


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_live_line_keeps_round_bar_time_and_eta_at_any_width(width):
    events = [ROW, {"event": "clients", "done": 4, "of": 10}]
    line = render(events, width=width, make=lambda c: RunDisplay("bar", 100, console=c))[-1]
    assert len(line) <= width
    assert line.startswith("round   4/100 ") and re.search(r"[━╸] *\d:\d\d:\d\d eta \d:\d\d:\d\d", line)
    if width >= 80:
        assert "clients 4/10" in line
    if width >= 100:
        assert "acc=0.9331" in line and "nll=0.2104" in line
    assert "…" not in line  # metrics that do not fit are dropped whole, nothing is squeezed


def test_the_sweep_line_shows_runs_done_and_the_current_runs_round():
    events = [{"event": "run-started", "name": "fedavg seed 0"}, {"event": "run-done", "name": "x"},
              {"event": "run-started", "name": "ivon-admm seed 1"}, {**ROW, "rounds": 10}]  # fmt: skip
    line = render(events, width=80, make=lambda c: SweepDisplay("bar", 4, console=c))[-1]
    assert line.startswith("runs 1/4 ") and "ivon-admm seed 1" in line and "round 3/10" in line and len(line) <= 80


def test_partition_alpha_moves_every_scheme_that_has_one_and_no_other():
    base = dict(dataset="digits", num_clients=6, seed=3)
    for scheme in ("papers-dirichlet", "dirichlet", "inner-dirichlet"):
        default = prepare(RunConfig.from_mapping({**base, "partition": scheme})).parts
        skewed = prepare(RunConfig.from_mapping({**base, "partition": scheme, "partition_alpha": 0.05})).parts
        assert any(not np.array_equal(a, b) for a, b in zip(default, skewed)), scheme
        explicit = prepare(RunConfig.from_mapping({**base, "partition": scheme, "partition_alpha": 0.5})).parts
        assert all(np.array_equal(a, b) for a, b in zip(default, explicit)), scheme  # 0 means the default 0.5
    with pytest.raises(ConfigError, match="partition_alpha: partition 'shard' has no Dirichlet"):
        prepare(RunConfig.from_mapping({**base, "partition": "shard", "partition_alpha": 0.3}))


def test_an_explicit_scheme_is_honoured_on_data_with_natural_clients():
    natural = prepare(RunConfig.from_mapping(dict(dataset="synthetic-logistic", num_clients=3, partition="auto")))
    iid = prepare(RunConfig.from_mapping(dict(dataset="synthetic-logistic", num_clients=3, partition="iid")))
    owners = natural.dataset.natural_clients
    assert all(len(np.unique(owners[p])) == 1 for p in natural.parts)  # auto: one generated client each
    assert any(len(np.unique(owners[p])) > 1 for p in iid.parts)  # iid: pooled, then split


def own_data(tmp_path: Path, dtype) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3)).astype(dtype)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(60)).astype(dtype)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y, client=np.repeat([0, 1, 2], 20))
    return path


def test_your_own_data_is_trained_in_full_and_float64_stays_float64(tmp_path):
    """(The exactness this keeps is tests/test_flower.py's one-round Newton test on float64 data.)"""
    config = RunConfig.from_mapping(dict(data=str(own_data(tmp_path, np.float64)), model="linear", num_clients=3))
    prepared = prepare(config)
    assert [len(p) for p in prepared.parts] == [20, 20, 20] and prepared.dataset.x_train.dtype == np.float64
    assert prepare(config.replace(local_test_fraction=0.2)).parts[0].size == 16  # a split when asked for
    single = prepare(config.replace(data=str(own_data(tmp_path, np.float32))))
    assert single.dataset.x_train.dtype == np.float32


def test_the_native_kernel_cache_is_keyed_by_the_cpu():
    signature = ivon_native.cpu_signature()
    assert signature.split("|")[0] and ("flags=" in signature or "Features=" in signature or "processor=" in signature)
    assert "cpu_signature().encode()" in Path(ivon_native.__file__).read_text()  # part of the library's tag


@pytest.mark.parametrize("clients", [7, 300])
def test_the_label_picture_stays_readable_at_any_number_of_clients(clients, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 20 * clients)
    parts = np.array_split(rng.permutation(len(labels)), clients)
    path = plot_label_distribution(labels, parts, tmp_path / "labels.png")
    with Image.open(path) as image:
        assert image.size[0] <= 2000 and image.size[1] <= 800  # bounded whatever the number of clients
        assert np.asarray(image.convert("L")).std() > 10


def test_the_evaluation_schedule_scores_the_rounds_it_names_and_the_same_model_as_every_round(tmp_path):
    """eval_every = 2, predictive_every = 4 over 5 rounds: rounds 2 and 4 scored, the predictive at 4, and
    round 5 (the last) scored with both; training is untouched, so every scored round's numbers equal
    those of a run that scores every round."""
    every = {**SMALL, "strategy": "ivon-admm", "rounds": 5, "local_test_fraction": 0.2}
    run(RunConfig.from_mapping({**every, "out": str(tmp_path / "every")}))
    run(RunConfig.from_mapping({**every, "eval_every": 2, "predictive_every": 4, "out": str(tmp_path / "sched")}))
    full, scheduled = rows_of(tmp_path / "every"), rows_of(tmp_path / "sched")
    assert [("accuracy" in r, "predictive_accuracy" in r) for r in scheduled] == [
        (False, False), (True, False), (False, False), (True, True), (True, True)
    ]  # fmt: skip
    for row, reference in zip(scheduled, full):
        for key in ("accuracy", "nll", "predictive_nll", "client_accuracy_worst"):
            if key in row:
                assert row[key] == reference[key], (row["round"], key)
    summary = json.loads((tmp_path / "sched" / "summary.json").read_text())
    assert summary["accuracy"] == full[-1]["accuracy"] and summary["predictive_nll"] == full[-1]["predictive_nll"]


def test_eval_clients_scores_a_fixed_sample_past_the_automatic_bound():
    from fedvb.experiment import scored_clients

    config = RunConfig.from_mapping({**SMALL, "num_clients": 250})
    sample = scored_clients(config)
    assert config.eval_clients == -1 and len(sample) == 100 == len(np.unique(sample))
    assert sample.tolist() == sorted(sample.tolist()) and sample.tolist() == scored_clients(config).tolist()
    assert scored_clients(config.replace(eval_clients=0)).tolist() == list(range(250))
    assert len(scored_clients(config.replace(eval_clients=7))) == 7
    assert scored_clients(config.replace(num_clients=40)).tolist() == list(range(40))  # every client up to 100
    with pytest.raises(ConfigError, match="eval_every"):
        RunConfig.from_mapping({**SMALL, "eval_every": 0})
