"""Run privadapt across real Flower processes: one SuperLink, N SuperNodes, TLS, node authentication.

Commands (``python -m deploy COMMAND --help``; walkthrough in docs/DEPLOYMENT.md):

    certs DIR [--host NAME]... [--sites NAME...]  the CA, the SuperLink certificate, node keys
    node-key DIR NAME                             one site's key pair, made on the site
    superlink DIR [--port P]                      the SuperLink: TLS, node authentication, state database
    site --name --data --superlink --ca --key ... one site: SuperNode + long-lived ClientApp
    local DIR --sites N [--run-config ...]        all of it on 127.0.0.1, one ``flwr run``, all stopped
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from deploy.certs import LOCAL_IPS, LOCAL_NAMES, Credentials, make_credentials, make_node_key
from deploy.flower import REPO_ROOT, connection_toml, flower_env, node_config, start_site, superlink_command
from deploy.local import LocalDeployment
from deploy.processes import ProcessGroup, wait_until


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
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n\n")[0])
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
