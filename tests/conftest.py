"""Fixtures shared by every suite: PostgreSQL databases, a GCS emulator, free ports."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.cluster import create_bucket, gcs_emulator, postgres_database


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def gcs_host() -> Iterator[str]:
    """A running gcp-storage-emulator; STORAGE_EMULATOR_HOST points at it for the session."""
    with gcs_emulator() as host:
        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = host
        try:
            yield host
        finally:
            if old is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture
def gcs_bucket(gcs_host: str) -> str:
    """A fresh bucket on the emulator; returns its name."""
    import uuid

    name = f"sax-{uuid.uuid4().hex[:10]}"
    create_bucket(gcs_host, name)
    return name
