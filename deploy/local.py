"""A whole federation on 127.0.0.1 as a context manager, and the result of one ``flwr run``.

:class:`LocalDeployment` starts a SuperLink (TLS, node authentication, state database) and N sites
under one folder, runs jobs with the ``flwr`` CLI and stops every process when the block ends
(tests and benchmarks use it; ``python -m deploy local`` is the same from the command line).
Each site runs ``flower-supernode --isolation process`` next to a long-lived ClientApp executor
(``deploy/warm_clientapp.py``), so its pipeline stays in memory across rounds; pass
``clientapp="flower"`` for Flower's default (a fresh ``flwr-clientapp`` process per message).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import psutil  # a dependency of accelerate and peft

from deploy.certs import Credentials, make_credentials
from deploy.flower import (BIN_DIR, CONNECTION, REPO_ROOT, config_text, connection_toml, flower_env, node_config,
                           start_site, superlink_command)
from deploy.processes import Process, ProcessGroup, free_port, leftovers, wait_until


ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


@dataclass
class RunResult:
    """One ``flwr run --stream``: its run id, final status, and every streamed line with its arrival time."""

    run_id: int | None
    status: str
    returncode: int
    seconds: float
    lines: list[tuple[float, str]]

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def round_starts(self) -> dict[int, float]:
        """Arrival time of each ``[ROUND k/N]`` line (first copy), by round."""
        starts: dict[int, float] = {}
        for at, line in self.lines:
            match = ROUND_LINE.search(line)
            if match:
                starts.setdefault(int(match.group(1)), at)
        return starts

    def first_time(self, needle: str) -> float | None:
        return next((at for at, line in self.lines if needle in line), None)


@dataclass
class Site:
    name: str
    node_id: int | None
    supernode: Process
    clientapp: Process | None

    def _events(self, kind: str) -> list[dict]:
        if self.clientapp is None:
            return []
        prefix = '{"event": "%s"' % kind
        return [json.loads(line) for line in self.clientapp.text().splitlines() if line.startswith(prefix)]

    def tasks(self) -> list[dict]:
        """The long-lived ClientApp's task records (one JSON line per message it served)."""
        return self._events("task")

    def busy_with(self, run_id: int) -> bool:
        """Whether the long-lived ClientApp has taken a task of ``run_id`` it has not finished."""
        done = {t["task_id"] for t in self.tasks()}
        return any(a["run_id"] == run_id and a["task_id"] not in done for a in self._events("acquired"))


class LocalDeployment:
    """A whole federation on 127.0.0.1 under ``root``: certificates and node keys, a SuperLink (TLS,
    node authentication, state database), sites (SuperNode + long-lived ClientApp, or Flower's
    default process per message with ``clientapp="flower"``), and the ``flwr`` CLI with its own
    FLWR_HOME. Free ports are picked at start. As a context manager it stops every process it
    started when the block ends, also on failure.
    """

    def __init__(self, root: Path, *, hosts: Sequence[str] = (), clientapp: str = "warm",
                 threads_per_site: int | None = None, timeout: float = 300.0) -> None:
        if clientapp not in ("warm", "flower"):
            raise ValueError(f"clientapp must be 'warm' or 'flower', not {clientapp!r}")
        self.root = Path(root).resolve()
        self.hosts = tuple(hosts)
        self.warm = clientapp == "warm"
        self.threads = threads_per_site
        self.timeout = timeout
        self.creds = Credentials(self.root)
        self.cli_home = self.root / "flwr-home"
        self.group = ProcessGroup(self.root / "logs")
        self.superlink: Process | None = None
        self.port: int | None = None
        self.sites: dict[str, Site] = {}
        self.runs = 0

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process of this deployment, the ones Flower started included."""
        self.group.stop()
        for proc in leftovers(self.root):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- SuperLink and CLI

    def start_superlink(self, site_names: Sequence[str]) -> None:
        """Make the credentials (sites' keys included), start the SuperLink, point the CLI at it."""
        make_credentials(self.root, site_names, self.hosts)
        self.port = free_port()
        home = self.root / "superlink"
        self.superlink = self.group.spawn("superlink", superlink_command(
            self.creds, home / "state.db", port=self.port), flower_env(home / "flwr-home"), cwd=home)
        (self.cli_home / "config.toml").parent.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(connection_toml(self.address, self.creds.ca_cert))
        wait_until(lambda: "Uvicorn running on https://" in self.superlink.text(), self.timeout,
                   "SuperLink listening", watch=[self.superlink])

    def flwr(self, *args: str, timeout: float = 180.0, check: bool = True,
             home: Path | None = None) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI with this deployment's FLWR_HOME (or ``home``)."""
        result = subprocess.run([str(BIN_DIR / "flwr"), *args], env=flower_env(home or self.cli_home), cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def register(self, name: str) -> int:
        """Register site ``name``'s public key with the SuperLink; return its node id."""
        out = self.flwr("supernode", "register", str(self.creds.node_public_key(name)), CONNECTION, "--format", "json")
        return int(json.loads(out.stdout)["node-id"])

    def nodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", ...) as the SuperLink lists them."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return {int(node["node-id"]): node["status"] for node in json.loads(out.stdout)["nodes"]}

    # -- sites

    def start_site(self, name: str, data: Path, partition_id: int, num_partitions: int, *, register: bool = True,
                   key: Path | None | str = "own", root_certificates: Path | None | str = "federation") -> Site:
        """Start site ``name`` on ``data``. By default its own key (registered first) and the federation's CA;
        pass ``register=False``, another ``key`` or ``root_certificates`` (None: none) to play an intruder."""
        node_id = self.register(name) if register else None
        site = Site(name, node_id, *start_site(
            self.group, name, self.address, node_config(name, data, partition_id, num_partitions),
            self.root / name / "flwr-home",
            root_certificates=self.creds.ca_cert if root_certificates == "federation" else root_certificates,
            key=self.creds.node_key(name) if key == "own" else key, warm=self.warm, threads=self.threads))
        self.sites[name] = site
        return site

    def wait_online(self, sites: Sequence[Site]) -> None:
        ids = {site.node_id for site in sites}
        watch = [p for site in sites for p in (site.supernode, site.clientapp) if p is not None]
        wait_until(lambda: all(self.nodes().get(i) == "online" for i in ids), self.timeout, "sites online",
                   interval=2.0, watch=watch)

    def start_federation(self, data: Path, num_sites: int) -> list[Site]:
        """SuperLink plus ``num_sites`` registered sites on ``data/site-K``, all online."""
        names = [f"site-{k}" for k in range(num_sites)]
        self.start_superlink(names)
        sites = [self.start_site(name, Path(data) / name, k, num_sites) for k, name in enumerate(names)]
        self.wait_online(sites)
        return sites

    # -- jobs

    def run(self, run_config: Mapping[str, object] | str, *, app: Path = REPO_ROOT, timeout: float = 1200.0) -> RunResult:
        """``flwr run APP <connection> --stream --run-config ...``; wait for it and read the run's status."""
        self.runs += 1
        log = self.group.log_dir / f"run-{self.runs}.log"
        command = [str(BIN_DIR / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", config_text(run_config)]
        lines: list[tuple[float, str]] = []
        started = time.time()
        popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                 env=flower_env(self.cli_home), cwd=REPO_ROOT, start_new_session=True)
        watchdog = threading.Timer(timeout, lambda: os.killpg(popen.pid, signal.SIGKILL))
        watchdog.start()
        try:
            with log.open("w") as handle:
                for line in popen.stdout:
                    lines.append((time.time(), line.rstrip("\n")))
                    handle.write(line)
                    handle.flush()
            returncode = popen.wait()
        finally:
            watchdog.cancel()
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        text = "\n".join(line for _, line in lines)
        match = re.search(r"Successfully started run (\d+)", text)
        run_id = int(match.group(1)) if match else None
        status = self.run_status(run_id) if run_id is not None else "not started"
        return RunResult(run_id, status, returncode, time.time() - started, lines)

    def run_status(self, run_id: int) -> str:
        out = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
        return json.loads(out.stdout)["runs"][0]["status"]
