"""Start and stop one SGLang server for one policy, with its log kept for the report."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


class ServerError(RuntimeError):
    """The server did not come up; the message carries its log tail."""


class Server:
    """``with Server(cmd, env, log) as url:`` a ready server, stopped (process group) on exit."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int, timeout: float = 600) -> None:
        self.cmd, self.env, self.log, self.timeout = cmd, env, log, timeout
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> str:
        if _port_taken(self.port):  # else /health would be answered by whatever holds the port
            raise ServerError(f"port {self.port} is already in use (a server left from an earlier run?)")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as logf:  # appended: a resumed bench keeps the log of the run it resumes
            logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n")
            logf.flush()
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise ServerError(f"server not ready after {self.timeout:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def server_parser(description: str, port: int, docs: int, max_new_tokens: int) -> argparse.ArgumentParser:
    """The arguments every GPU proof script shares (``bench/soak.py``, ``bench/restart_proof.py``):
    the model, the output folder, the document workload's size, each server's memory share and
    port, the server command (tests use a stand-in), and SGLang's own arguments after ``--``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--docs", type=int, default=docs)
    p.add_argument("--doc-chars", type=int, default=9000, help="about 2.3k SmolLM2 tokens")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--mem-fraction", type=float, default=0.3, help="--mem-fraction-static of each server")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--launcher", default=f"{sys.executable} -m sglang.launch_server",
                   help="the server command (tests use a stand-in)")
    p.add_argument("sglang_args", nargs=argparse.REMAINDER, help="after --: passed to every server")
    return p


def parse_server_args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    a = p.parse_args(argv)
    a.sglang_args = [x for x in a.sglang_args if x != "--"]
    return a


def server_command(args: argparse.Namespace) -> list[str]:
    """The command line every server of a proof script starts with (its own flags follow)."""
    return [*shlex.split(args.launcher), "--model-path", args.model, "--host", "127.0.0.1",
            "--mem-fraction-static", str(args.mem_fraction), *args.sglang_args]


def ask(url: str, prompt: str, max_new_tokens: int) -> dict:
    """One greedy /generate call: the answer text and how many prompt tokens came from the cache."""
    r = requests.post(url + "/generate", json={"text": prompt, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens}}, timeout=300)
    r.raise_for_status()
    out = r.json()
    return {"answer": out["text"], "cached_tokens": out["meta_info"].get("cached_tokens")}
