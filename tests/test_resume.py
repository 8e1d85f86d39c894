"""Checkpoints: SIGKILL a run at any moment, resume it, and get exactly the numbers of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedvb.cli import main

ARGS = ["--strategy", "ivon-admm", "--dataset", "synthetic-logistic", "--model", "softmax", "--num-clients", "5",
        "--set", "lr=0.002", "--set", "ivon_beta2=0.999", "--set", "local_epochs=4", "--set", "batch_size=8",
        "--set", "fraction_train=0.6", "--set", "faults=nan=0.2"]  # fmt: skip
TIMES = ("train_time_s", "wall_time_s", "elapsed_s")
LOSSES = 3  # the exit code of a run that finished with rejected replies: ARGS injects NaN replies


def rows_without_times(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


def assert_same_run(folder: Path, reference: Path) -> None:
    assert rows_without_times(folder) == rows_without_times(reference)  # exact, not approximate
    with np.load(folder / "posterior.npz") as got, np.load(reference / "posterior.npz") as want:
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key])


def start_run(out: Path, rounds: int, **popen) -> subprocess.Popen:
    """``fedvb run`` of ARGS into ``out`` as a child process (its output dropped unless ``popen`` says)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    command = [sys.executable, "-m", "fedvb.cli", "run", *ARGS, "--rounds", str(rounds), "--out", str(out), "--quiet"]
    return subprocess.Popen(command, env=env, **popen)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", *ARGS, "--rounds", "14", "--out", str(out), "--quiet"]) == LOSSES
    return out


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "killed"
    process = start_run(out, 14)
    deadline = time.monotonic() + 180
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(metrics.read_text().splitlines())
    assert 4 <= done < 14, f"the kill should land mid-run, after {done} rounds"
    assert not (out / "summary.json").exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == LOSSES
    assert_same_run(out, reference)


def written(out: Path, moment: str) -> bool:
    if moment == "config":  # the folder is claimed, nothing else yet
        return (out / "config.toml").exists()
    if moment == "round-0-checkpoint":  # before round 1 starts
        return (out / "checkpoint.pt").exists()
    if moment == "checkpoint-write":  # while a checkpoint is being written
        return (out / "checkpoint.pt.tmp").exists()
    metrics = out / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= 2  # "round-2"


@pytest.mark.parametrize("moment", ["config", "round-0-checkpoint", "checkpoint-write", "round-2"])
def test_sigkill_at_any_moment_from_the_first_write_resumes_to_the_same_numbers(moment, reference, tmp_path):
    out = tmp_path / "killed"
    process = start_run(out, 14)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and not written(out, moment):
        pass  # poll without sleeping: a checkpoint write lasts milliseconds
    assert process.poll() is None, f"the run ended before the moment {moment!r} was seen"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "summary.json").exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == LOSSES  # a stale lock of a dead process is no obstacle
    assert_same_run(out, reference)
    assert not (out / ".lock").exists()


def test_a_live_run_folder_is_locked_against_a_second_run(tmp_path, capsys):
    out = tmp_path / "run"
    process = start_run(out, 40)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.01)
        assert main(["run", "--resume", str(out), "--quiet"]) == 2
        assert f"out: {out} is being written by another fedvb run (PID {process.pid})" in capsys.readouterr().err
        assert main(["run", *ARGS, "--rounds", "2", "--out", str(out), "--overwrite", "--quiet"]) == 2
        assert "is being written by another fedvb run" in capsys.readouterr().err
    finally:
        process.kill()
        process.wait(timeout=60)


def test_ctrl_c_ends_with_one_line_exit_130_and_a_resumable_folder(reference, tmp_path):
    out = tmp_path / "run"
    # Ctrl-C as at a terminal: the child's SIGINT at its default (a shell that starts this suite in the background
    # hands it down ignored, and Python then never raises KeyboardInterrupt)
    process = start_run(out, 14, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not written(out, "round-2"):
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == f"fedvb: interrupted; continue with: fedvb run --resume {out}"
    assert "Traceback" not in err
    assert main(["run", "--resume", str(out), "--quiet"]) == LOSSES
    assert_same_run(out, reference)


def test_resume_after_a_crash_between_checkpoint_and_metrics_line(reference, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *ARGS, "--rounds", "5", "--out", str(out), "--quiet"]) == LOSSES
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last row never reached the file
    (out / "summary.json").unlink()
    # resuming with more rounds continues from round 6 (the checkpoint holds round 5 and its row)
    assert main(["run", "--resume", str(out), "--rounds", "14", "--quiet"]) == LOSSES
    assert "rounds = 14" in (out / "config.toml").read_text()
    assert_same_run(out, reference)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "/nonexistent"], "resume: /nonexistent holds no config.toml to resume from"),
        (["--resume", "/tmp", "--strategy", "fedavg"], "resume: continues DIR/config.toml as it is"),
    ],
)
def test_bad_resume_requests(args, message, capsys):
    assert main(["run", *args]) == 2
    assert message in capsys.readouterr().err
