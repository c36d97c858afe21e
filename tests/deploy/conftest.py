"""Fixtures of the tests/deploy suite: the compose model as `.env.example` interpolates it."""
from __future__ import annotations

from typing import Any

import pytest

from tests.deploy import deploylib as dl


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return dl.read_env_file(dl.ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(dotenv: dict[str, str]) -> dict[str, Any]:
    return dl.load_compose(dotenv)
