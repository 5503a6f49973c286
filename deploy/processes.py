"""Processes started together and stopped together, each in its own session with a log file;
free ports, waiting on a condition while watching processes, finding leftovers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import psutil  # a dependency of accelerate and peft


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """A started process (its own process group) and its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


@dataclass
class ProcessGroup:
    """Processes started together and stopped together: each in its own session, logs in ``log_dir``.
    ``stop`` ends every process and every descendant (Flower's SuperExec detaches into its own
    session), politely first, then with SIGKILL."""

    log_dir: Path
    processes: list[Process] = field(default_factory=list)

    def spawn(self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as handle:
            popen = subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, env=dict(env),
                                     cwd=cwd, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def stop(self, grace: float = 10.0) -> None:
        victims: list[psutil.Process] = []
        for process in reversed(self.processes):
            try:
                root = psutil.Process(process.popen.pid)
                victims += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            try:
                os.killpg(process.popen.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for victim in victims:
            try:
                victim.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for victim in alive:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for process in self.processes:
            try:
                process.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.popen.kill()
        self.processes.clear()


def leftovers(root: Path) -> list:
    """Processes still running whose FLWR_HOME lies under ``root`` (every Flower process started
    for a deployment has one, also those its SuperLink and SuperNodes started themselves)."""
    prefix = str(Path(root).resolve())
    found = []
    for proc in psutil.process_iter():
        try:
            home = proc.environ().get("FLWR_HOME", "")
        except (psutil.Error, OSError):
            continue
        if home == prefix or home.startswith(prefix + os.sep):
            found.append(proc)
    return found


def wait_until(condition, timeout: float, what: str, *, interval: float = 0.5, watch: Sequence[Process] = ()) -> None:
    """Poll ``condition`` until it holds; fail early, with the log, when a watched process exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        for process in watch:
            if not process.running:
                raise RuntimeError(f"{process.name} exited ({process.popen.returncode}) while waiting for {what}:\n"
                                   f"{process.tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in watch)
            raise TimeoutError(f"no {what} after {timeout:.0f} s\n{logs}")
        time.sleep(interval)
