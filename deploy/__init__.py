"""Deploying privadapt across real Flower processes: a SuperLink with TLS and node authentication,
one SuperNode per site next to a long-lived ClientApp, and the ``flwr`` CLI that submits jobs.

It is the operators' side of the federation, kept out of the FAB (which carries common, client
and server only): certificates and node keys (certs), process supervision (processes), Flower's
commands and configuration (flower), a whole federation on 127.0.0.1 for tests and benchmarks
(local), the command line (cli, ``python -m deploy``) and the site's long-lived ClientApp
(warm_clientapp). Walkthrough: docs/DEPLOYMENT.md.
"""
