"""``flwr run .`` from the repository root completes a 2-round run; its status is checked, not its exit code."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).with_name("flwr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes_mentioning(text: str) -> None:
    """The local SuperLink (and its SuperExec) outlive `flwr run`; stop the ones this test started."""
    found = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()
    for pid in map(int, found):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    time.sleep(1)
    for pid in map(int, subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not FLWR.exists() and shutil.which("flwr") is None, reason="flwr CLI not installed")
def test_flwr_run_completes_two_rounds(tmp_path):
    control, http = free_port(), free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else uv installs a CUDA torch
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = tmp_path / "run"
    overrides = f"rounds=2 num_clients=3 dataset='synthetic-logistic' model='softmax' partition='iid' out='{out}'"
    try:
        done = subprocess.run(
            [str(FLWR), "run", ".", "--stream", "--federation-config", "num-supernodes=3", "--run-config", overrides],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        listing = subprocess.run(
            [str(FLWR), "list", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        stop_processes_mentioning(f"127.0.0.1:{http}")
        stop_processes_mentioning(f":{control}")
    runs = json.loads(listing.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], done.stdout[-3000:] + done.stderr[-3000:]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [1, 2]
    assert (out / "posterior.npz").exists()
