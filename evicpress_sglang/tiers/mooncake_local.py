"""A Mooncake Store on this host's loopback: ``mooncake_master`` and its HTTP metadata
server on free 127.0.0.1 ports, for the tests, the GPU proofs and a single-host trial.

The metadata server is Mooncake's Python one (``mooncake.http_metadata_server``), not the
master's built-in one: in Mooncake 0.3.13 ``--http_metadata_server_host`` is logged but
ignored (it listens on 0.0.0.0), while the Python server binds the host it is given.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .base import TierError
from .remote import INSTALL_HINT

LOOPBACK = "127.0.0.1"


def require_mooncake() -> Path:
    """The directory of the installed ``mooncake`` package (holding ``mooncake_master``);
    a :class:`TierError` saying what to install when it or its system libraries are missing."""
    try:
        import mooncake
        import mooncake.store  # noqa: F401  (loads the native library: proves the system libraries are there)
    except ImportError as e:
        raise TierError(f"Mooncake is not usable here: {e}. {INSTALL_HINT}") from e
    return Path(mooncake.__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after start-up: {log.read_text()[-2000:]}")


@dataclass
class MooncakeServer:
    """A running master and metadata server, and the settings that reach them."""

    master_port: int
    metadata_port: int
    metrics_port: int
    master: subprocess.Popen
    metadata: subprocess.Popen
    logs: Path

    @property
    def master_address(self) -> str:
        return f"{LOOPBACK}:{self.master_port}"

    def remote_config(self, namespace: str, **overrides) -> dict:
        """A ``remote`` setting for :func:`make_remote_tier` that reaches this store over
        loopback TCP only, with small segments (each client contributes its segment's memory)."""
        return {"backend": "mooncake", "master_server_address": self.master_address,
                "metadata_server": f"http://{LOOPBACK}:{self.metadata_port}/metadata",
                "local_hostname": LOOPBACK, "protocol": "tcp", "global_segment_size": "64MiB",
                "local_buffer_size": "32MiB", "namespace": namespace, **overrides}

    def kill_master(self) -> None:
        self.master.send_signal(signal.SIGKILL)
        self.master.wait()

    def stop(self) -> None:
        for proc in (self.master, self.metadata):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def mooncake_server(logs: Path) -> Iterator[MooncakeServer]:
    """Start a master and its metadata server on free 127.0.0.1 ports; stop them after."""
    package = require_mooncake()
    logs.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(3)]
    master_port, metadata_port, metrics_port = ports
    meta_log, master_log = logs / "metadata.log", logs / "master.log"
    metadata = subprocess.Popen(
        [sys.executable, "-m", "mooncake.http_metadata_server", "--host", LOOPBACK, "--port", str(metadata_port)],
        stdout=meta_log.open("w"), stderr=subprocess.STDOUT)
    binary = str(package / "mooncake_master")
    # Mooncake before 0.3.13 has no --metrics_host (its metrics then listen where it decides)
    flags = subprocess.run([binary, "--helpfull"], capture_output=True, text=True, timeout=30).stdout
    metrics = [f"--metrics_host={LOOPBACK}", f"--metrics_port={metrics_port}"] if "metrics_host" in flags else []
    master = subprocess.Popen(
        [binary, f"--rpc_address={LOOPBACK}", f"--rpc_port={master_port}", *metrics,
         "--enable_http_metadata_server=false", "--logtostderr=true", "--rpc_thread_num=2"],
        stdout=master_log.open("w"), stderr=subprocess.STDOUT)
    server = MooncakeServer(master_port, metadata_port, metrics_port, master, metadata, logs)
    try:
        deadline = time.monotonic() + 30
        _wait_listening(metadata_port, metadata, meta_log, deadline)
        _wait_listening(master_port, master, master_log, deadline)
        yield server
    finally:
        server.stop()
