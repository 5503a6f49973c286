"""Flower's processes and CLI for privadapt: their environment, the commands of the SuperLink,
a SuperNode and the long-lived ClientApp (``deploy/warm_clientapp.py``), one site's processes,
run-config / node-config text, and the ``flwr`` CLI's connection to a TLS SuperLink."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Mapping

from deploy.certs import Credentials
from deploy.processes import Process, ProcessGroup, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
WARM_CLIENTAPP = REPO_ROOT / "deploy" / "warm_clientapp.py"
BIN_DIR = Path(sys.executable).parent  # this venv's flwr, flower-superlink, flower-supernode, flwr-clientapp
CONNECTION = "privadapt-deploy"  # the connection name written into $FLWR_HOME/config.toml


def toml_value(value: object) -> str:
    """One run-config / node-config value in TOML (Flower's ``key=value`` syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def config_text(config: Mapping[str, object] | str) -> str:
    return config if isinstance(config, str) else " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def flower_env(home: Path, threads: int | None = None) -> dict[str, str]:
    """Environment of one Flower process: this venv's commands first, its own FLWR_HOME, offline,
    no runtime ``uv sync`` of the app's dependencies, optionally a thread cap (sites sharing cores)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def superlink_command(creds: Credentials, database: Path, *, host: str = "127.0.0.1", port: int = 9092) -> list[str]:
    """flower-superlink with TLS, node authentication, a state database and no runtime ``uv sync``."""
    return ["flower-superlink", "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth", "--database", str(database),
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]


def node_config(name: str, data: Path, partition_id: int, num_partitions: int) -> str:
    return config_text({"partition-id": partition_id, "num-partitions": num_partitions,
                        "data-path": str(Path(data).resolve()), "site-name": name})


def supernode_command(superlink: str, runtime_port: int, config: str, *, root_certificates: Path | None,
                      key: Path | None, warm: bool) -> list[str]:
    """flower-supernode for one site; ``warm`` leaves its ClientApp tasks to a long-lived process."""
    command = ["flower-supernode", "--superlink", superlink, "--port", str(runtime_port), "--node-config", config]
    if root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    if warm:
        command += ["--isolation", "process"]
    return command


def warm_clientapp_command(runtime_port: int, supernode_pid: int) -> list[str]:
    return [sys.executable, str(WARM_CLIENTAPP), "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--parent-pid", str(supernode_pid)]


def start_site(group: ProcessGroup, name: str, superlink: str, config: str, home: Path, *,
               root_certificates: Path | None, key: Path | None, warm: bool = True,
               threads: int | None = None) -> tuple[Process, Process | None]:
    """One site's SuperNode and (``warm``) its long-lived ClientApp process."""
    runtime_port = free_port()
    env = flower_env(home, threads)
    supernode = group.spawn(f"{name}-supernode", supernode_command(
        superlink, runtime_port, config, root_certificates=root_certificates, key=key, warm=warm), env, cwd=home)
    clientapp = None
    if warm:
        clientapp = group.spawn(f"{name}-clientapp", warm_clientapp_command(runtime_port, supernode.popen.pid), env,
                                cwd=home)
    return supernode, clientapp


def connection_toml(address: str, ca_cert: Path, name: str = CONNECTION) -> str:
    """The ``flwr`` CLI's connection to a TLS SuperLink, for ``$FLWR_HOME/config.toml``."""
    return (f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
            f'root-certificates = "{Path(ca_cert).resolve()}"\n')
