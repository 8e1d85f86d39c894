"""Start and stop only our own processes: a Ray head in its own temp dir, servers found by a unique marker.

Nothing here stops processes machine-wide (no ``ray stop``, ``pkill`` or ``killall``): a process is stopped
only when its command line names a path or port that this test made for itself.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_processes() -> Iterator[tuple[int, str]]:
    """``(pid, command line)`` of every process of this user but this one, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        yield int(entry.name), command


def pids_mentioning(marker: str) -> list[int]:
    """PIDs (of this user, not this one) whose command line contains ``marker``; a marker ending in a digit
    (a port) must not run on into more digits (":5842" is not ":58421")."""
    pattern = re.compile(re.escape(marker) + (r"(?!\d)" if marker[-1:].isdigit() else ""))
    return [pid for pid, command in _own_processes() if pattern.search(command)]


def stop_pids_mentioning(marker: str, *, grace_s: float = 5.0) -> None:
    """SIGTERM every process whose command line holds ``marker``, then SIGKILL those still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_mentioning(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextmanager
def ray_head(*, num_cpus: int = 2, dashboard: bool = False) -> Iterator[dict]:
    """A Ray head on loopback in a temp dir of its own; on exit its processes (found by that temp dir, and
    the ``ray start --block`` process group) are stopped, whatever happened. Yields ``address``, ``env``
    and, with ``dashboard``, ``dashboard_url``."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp}"]  # fmt: skip
    info: dict = {"address": f"127.0.0.1:{port}", "env": env, "temp": temp}
    if dashboard:
        dashboard_port = free_port()
        command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--ray-client-server-port={free_port()}"]  # fmt: skip
        info["dashboard_url"] = f"http://127.0.0.1:{dashboard_port}"
    else:
        command.append("--include-dashboard=false")
    log = open(temp / "ray-start.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info["session"] = head.pid  # every process of this head (GCS, raylet, workers) is in its session
    try:
        _wait_for_start(head, temp / "ray-start.log", timeout_s=180)
        if dashboard:
            _wait_for_port(dashboard_port, head, temp / "ray-start.log", timeout_s=120)
        yield info
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the head it started
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        stop_pids_mentioning(str(temp))  # anything of this head that outlived it (workers, raylet, GCS)
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def _wait_for_start(process: subprocess.Popen, log: Path, *, timeout_s: float) -> None:
    """Until ``ray start`` says the runtime started (the GCS port opens before the raylet is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-2000:]}")
        if "Ray runtime started" in log.read_text():
            return
        time.sleep(0.5)
    raise TimeoutError(f"ray start did not finish within {timeout_s} s: {log.read_text()[-2000:]}")


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} did not open within {timeout_s} s: {log.read_text()[-2000:]}")


def session_pids(session: int, command_prefix: str) -> list[int]:
    """PIDs of this user in process session ``session`` whose command line starts with ``command_prefix``
    (Ray names its workers' processes after what they run, e.g. ``ray::ClientAppActor``)."""
    found = []
    for pid, command in _own_processes():
        try:
            if command.startswith(command_prefix) and os.getsid(pid) == session:
                found.append(pid)
        except OSError:  # gone meanwhile
            continue
    return sorted(found)
