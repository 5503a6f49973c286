"""Fixtures for the server tests."""

import pytest


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Outside a Flower run, Message() needs the process' task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
