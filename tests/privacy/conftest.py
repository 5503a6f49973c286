"""Fixtures for the red-team (privacy) tests."""

import pytest


@pytest.fixture(autouse=True)
def _message_identity(task_identity):
    """Every test here builds Flower Messages outside a run (tests/conftest.py's task_identity)."""
