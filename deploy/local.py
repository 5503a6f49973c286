"""Run privadapt across real Flower processes: one SuperLink, N SuperNodes, TLS, node authentication.

A deployment folder holds everything one federation needs::

    certs/ca.crt  certs/ca.key             the federation's certificate authority (keep ca.key offline)
    certs/superlink.crt  superlink.key     the SuperLink's TLS certificate (SANs: localhost, 127.0.0.1, ::1, hosts)
    keys/site-K  keys/site-K.pub           site K's EC P-384 node key pair (OpenSSH format)

Commands (``python -m deploy.local COMMAND --help``; walkthrough in docs/DEPLOYMENT.md):

    certs DIR [--host NAME]... [--sites NAME...]  the CA, the SuperLink certificate, node keys
    node-key DIR NAME                             one site's key pair, made on the site
    superlink DIR [--port P]                      the SuperLink: TLS, node authentication, state database
    site --name --data --superlink --ca --key ... one site: SuperNode + long-lived ClientApp
    local DIR --sites N [--run-config ...]        all of it on 127.0.0.1, one ``flwr run``, all stopped

:class:`LocalDeployment` is the same thing as a context manager (tests and benchmarks use it).
Each site runs ``flower-supernode --isolation process`` next to a long-lived ClientApp executor
(``deploy/warm_clientapp.py``), so its pipeline stays in memory across rounds; pass
``clientapp="flower"`` for Flower's default (a fresh ``flwr-clientapp`` process per message).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import psutil  # a dependency of accelerate and peft
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parent.parent
WARM_CLIENTAPP = REPO_ROOT / "deploy" / "warm_clientapp.py"
BIN_DIR = Path(sys.executable).parent  # this venv's flwr, flower-superlink, flower-supernode, flwr-clientapp
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
CERT_DAYS = 365
CONNECTION = "privadapt-deploy"  # the connection name written into $FLWR_HOME/config.toml


# --------------------------------------------------------------------------- certificates and keys


class Credentials:
    """Paths of one deployment's certificates and node keys under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        certs = self.root / "certs"
        self.ca_cert, self.ca_key = certs / "ca.crt", certs / "ca.key"
        self.server_cert, self.server_key = certs / "superlink.crt", certs / "superlink.key"

    def node_key(self, site: str) -> Path:
        return self.root / "keys" / site

    def node_public_key(self, site: str) -> Path:
        return self.root / "keys" / f"{site}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer: x509.Name | None, signing_key, *, ca: bool,
                 hosts: Sequence[str] = ()) -> x509.Certificate:
    """A certificate for ``subject``; self-signed when ``issuer`` is None (the CA)."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privadapt"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(issuer or name).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(
                       x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True))
    return builder.sign(signing_key, hashes.SHA256())


def make_ca(creds: Credentials, name: str = "privadapt federation CA") -> None:
    """Create the federation's CA (skipped when it exists: re-running keeps issued certificates valid)."""
    if creds.ca_cert.exists() and creds.ca_key.exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(name, key.public_key(), None, key, ca=True)
    _write_private(creds.ca_key, _pem_key(key))
    creds.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(creds: Credentials, hosts: Sequence[str] = ()) -> list[str]:
    """Issue the SuperLink's TLS certificate for ``hosts`` plus localhost/127.0.0.1/::1; return the SANs."""
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES, *LOCAL_IPS]))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(names[0], key.public_key(), ca_cert.subject, ca_key, ca=False, hosts=names)
    _write_private(creds.server_key, _pem_key(key))
    creds.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return names


def make_node_key(creds: Credentials, site: str) -> Path:
    """Create site ``site``'s EC P-384 key pair in OpenSSH format (kept when it exists); return the public key."""
    private, public = creds.node_key(site), creds.node_public_key(site)
    if not (private.exists() and public.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return public


def make_credentials(root: Path, sites: Sequence[str], hosts: Sequence[str] = ()) -> Credentials:
    """CA (kept if present), a fresh SuperLink certificate, and a key pair per site (kept if present)."""
    creds = Credentials(Path(root).resolve())
    make_ca(creds)
    make_server_cert(creds, hosts)
    for site in sites:
        make_node_key(creds, site)
    return creds


# --------------------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


# --------------------------------------------------------------------------- one federation on 127.0.0.1


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


def connection_toml(address: str, ca_cert: Path, name: str = CONNECTION) -> str:
    """The ``flwr`` CLI's connection to a TLS SuperLink, for ``$FLWR_HOME/config.toml``."""
    return (f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
            f'root-certificates = "{Path(ca_cert).resolve()}"\n')


# --------------------------------------------------------------------------- command line


def cmd_certs(args: argparse.Namespace) -> None:
    creds = make_credentials(args.dir, args.sites, args.host)
    print(f"CA:        {creds.ca_cert}  (give it to every site and every flwr user; keep {creds.ca_key.name} offline)")
    print(f"SuperLink: {creds.server_cert}  SANs: {', '.join([*args.host, *LOCAL_NAMES, *LOCAL_IPS])}")
    for site in args.sites:
        print(f"{site}: private key {creds.node_key(site)} (to the site only), public key {creds.node_public_key(site)}")


def cmd_node_key(args: argparse.Namespace) -> None:
    public = make_node_key(Credentials(Path(args.dir).resolve()), args.name)
    print(f"private key {public.with_suffix('')} stays on this site; send {public} to the federation operator")


def cmd_superlink(args: argparse.Namespace) -> None:
    creds = Credentials(Path(args.dir).resolve())
    home = creds.root / "superlink"
    command = superlink_command(creds, home / "state.db", host=args.host, port=args.port)
    print(f"# connection for $FLWR_HOME/config.toml (flwr CLI users):\n"
          f"{connection_toml(f'{args.public_name}:{args.port}', creds.ca_cert)}", flush=True)
    env = flower_env(home / "flwr-home")
    os.chdir(home)
    os.execvpe(command[0], command, env)


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (a service manager's stop) both unwind into the ``finally`` that stops
    the processes, also when the shell started this command with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def cmd_site(args: argparse.Namespace) -> None:
    stop_on_signals()
    group = ProcessGroup(Path(args.logs).resolve())
    config = node_config(args.name, Path(args.data), args.partition_id, args.num_partitions)
    try:
        processes = [p for p in start_site(group, args.name, args.superlink, config, Path(args.home).resolve(),
                                           root_certificates=Path(args.ca).resolve(), key=Path(args.key).resolve(),
                                           warm=not args.flower_isolation) if p is not None]
        print(f"{args.name}: SuperNode pid {processes[0].popen.pid}; logs in {group.log_dir}", flush=True)
        wait_until(lambda: False, float("inf"), "a process to exit", interval=2.0, watch=processes)
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:
        print(err, file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        group.stop()


def cmd_local(args: argparse.Namespace) -> None:
    from common.config import parse_overrides
    from common.tiny_sd import tiny_sd_dir

    stop_on_signals()
    root = Path(args.dir).resolve()
    # --sites declares the public number of sites K (num-sites) unless --run-config does
    config = {"model-path": str(tiny_sd_dir()), "data-path": str(Path(args.data).resolve()),
              "output-dir": str(root / "output"), "num-sites": args.sites, **parse_overrides(args.run_config)}
    with LocalDeployment(root, clientapp="flower" if args.flower_isolation else "warm",
                         threads_per_site=args.threads_per_site) as deployment:
        deployment.start_federation(Path(args.data), args.sites)
        print(f"SuperLink {deployment.address}, {args.sites} sites online; logs in {deployment.group.log_dir}", flush=True)
        result = deployment.run(config)
        print(f"run {result.run_id}: {result.status} in {result.seconds:.0f} s; output in {config['output-dir']}")
    if not result.completed:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    certs = commands.add_parser("certs", help="make the CA, the SuperLink certificate and the sites' node keys")
    certs.add_argument("dir", help="deployment folder (certs/ and keys/ go here)")
    certs.add_argument("--sites", nargs="*", default=[], help="site names, one key pair each (e.g. site-0 site-1)")
    certs.add_argument("--host", action="append", default=[],
                       help="the SuperLink's host name or IP as sites reach it (repeatable)")
    certs.set_defaults(func=cmd_certs)

    node_key = commands.add_parser("node-key", help="make one site's key pair, on the site")
    node_key.add_argument("dir")
    node_key.add_argument("name")
    node_key.set_defaults(func=cmd_node_key)

    link = commands.add_parser("superlink", help="run the SuperLink (TLS, node authentication) in the foreground")
    link.add_argument("dir", help="deployment folder made by `certs`")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on")
    link.add_argument("--port", type=int, default=9092)
    link.add_argument("--public-name", default="127.0.0.1", help="the host name sites and users connect to")
    link.set_defaults(func=cmd_superlink)

    site = commands.add_parser("site", help="run one site: SuperNode + long-lived ClientApp, until Ctrl-C")
    site.add_argument("--name", required=True)
    site.add_argument("--data", required=True, help="the site's image folder")
    site.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    site.add_argument("--ca", required=True, help="the federation's CA certificate (ca.crt)")
    site.add_argument("--key", required=True, help="the site's private node key")
    site.add_argument("--partition-id", type=int, required=True)
    site.add_argument("--num-partitions", type=int, required=True)
    site.add_argument("--home", default="flwr-home", help="this site's FLWR_HOME (installed app code)")
    site.add_argument("--logs", default="logs")
    site.add_argument("--flower-isolation", action="store_true",
                      help="Flower's default instead: a fresh ClientApp process (and model load) per message")
    site.set_defaults(func=cmd_site)

    local = commands.add_parser("local", help="SuperLink + N sites on 127.0.0.1, one `flwr run`, all stopped")
    local.add_argument("dir", help="deployment folder (certificates, state, logs, output)")
    local.add_argument("--sites", type=int, default=2)
    local.add_argument("--data", default=str(REPO_ROOT / "data" / "demo"), help="folder of site-K folders")
    local.add_argument("--run-config", default="", help="Flower's key=value overrides")
    local.add_argument("--threads-per-site", type=int, default=None)
    local.add_argument("--flower-isolation", action="store_true")
    local.set_defaults(func=cmd_local)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
