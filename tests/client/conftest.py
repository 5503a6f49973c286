"""Fixtures shared by the client tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def task_identity(monkeypatch):
    """The run, node and task identity Flower's Message needs outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
