"""The benchmark tests' PostgreSQL server (tests/bench/postgres.py): started once per test process for the tests
that ask for it, installed first when the machine has none, stopped and removed at the end. No skip: a server that
cannot be installed or started fails the tests that need it, with the reason."""

from __future__ import annotations

import re

import pytest
from postgres import PostgresServer, start_server


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    server = start_server()
    took = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in server.timings.items())
    print(f"\nPostgreSQL server on 127.0.0.1:{server.port} ({server.bindir}): {took}")
    try:
        server.connect().close()  # the driver is there and the server answers, or the error says which is not
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database for this test; its SQLAlchemy URL (``postgresql+psycopg://...``)."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:60]
    return postgres_server.create_database(name)
