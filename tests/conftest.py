"""Fixtures shared by every suite: PostgreSQL databases, a GCS emulator, free ports."""
from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Iterator

import pytest

from tests.cluster import create_bucket, gcs_emulator, postgres_database, warm_compilation_cache

if TYPE_CHECKING:
    from tests.frontend.conftest import Cell

# One XLA compilation cache for this test session (in-process JAX and every model
# server process it starts): the same tiny shapes compile once, not once per server.
_XLA_CACHE = tempfile.mkdtemp(prefix="sax-xla-")
os.environ.setdefault("SAX_COMPILATION_CACHE", _XLA_CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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


@pytest.fixture(scope="session")
def tiny_compiled() -> None:
    """test.tiny's programs (TINY_OVERRIDES shapes) are in the session's XLA cache."""
    warm_compilation_cache()


@pytest.fixture(scope="session")
def cell(tmp_path_factory: pytest.TempPathFactory, tiny_compiled: None) -> Iterator["Cell"]:
    """One real cell for the session (tests/frontend/conftest.py describes it), shared by
    tests/frontend and tests/security."""
    from tests.frontend.conftest import start_cell

    with start_cell(tmp_path_factory.mktemp("frontend-cell")) as c:
        yield c


@pytest.fixture(scope="session")
def url(cell: "Cell") -> str:
    return cell.url


#: Fixtures that start a whole cell of real processes (admin, model servers, frontends under
#: gunicorn): every test that uses one is an end-to-end test, in the `slow` tier.
WHOLE_CELL_FIXTURES = frozenset({"cell", "url", "locked", "fault_cell", "hostile"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests on whole-cell fixtures `slow` (`pytest -m "not slow"` is the fast tier)."""
    for item in items:
        if WHOLE_CELL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
