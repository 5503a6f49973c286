"""What the deployment tests share: a federation of real Flower processes on 127.0.0.1."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from common.paths import REPO_ROOT
from deploy.local import LocalDeployment
from deploy.processes import leftovers

DATA = REPO_ROOT / "data" / "demo"


@contextmanager
def federation(tmp_path_factory, name: str, sites: int) -> Iterator[LocalDeployment]:
    """A SuperLink and ``sites`` SuperNodes holding data/demo's first sites; on exit every
    process is stopped and none may outlive the deployment."""
    root = tmp_path_factory.mktemp(name)
    with LocalDeployment(root, threads_per_site=1) as dep:
        dep.start_federation(DATA, sites)
        yield dep
    assert leftovers(root) == [], "a Flower process outlived the deployment"
