"""``python -m deploy``: the deployment command line (deploy/cli.py)."""

from deploy.cli import main

main()
