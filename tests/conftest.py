"""Real services for the tests, and a fresh database and topics for each test.

Services come from, in order: the CONVSTATS_DATABASE_URL and
CONVSTATS_KAFKA_BOOTSTRAP_SERVERS variables; containers, where a Docker engine
answers; the project's own local stack (``convstats stack up``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from worker import db, migrations, stack
from worker import settings as settings_module


@dataclasses.dataclass(frozen=True)
class Services:
    database_url: str
    kafka_bootstrap_servers: str


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    url = os.environ.get("CONVSTATS_DATABASE_URL")
    kafka = os.environ.get("CONVSTATS_KAFKA_BOOTSTRAP_SERVERS")
    if url and kafka:
        yield Services(url, kafka)
    elif _docker_answers():
        yield from _containers()
    else:
        env = stack.up()
        yield Services(env.database_url, env.kafka_bootstrap_servers)


def _containers() -> Iterator[Services]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with (
        PostgresContainer("postgres:15", driver=None) as pg,
        KafkaContainer("apache/kafka:4.1.1") as kafka,
    ):
        yield Services(pg.get_connection_url(), kafka.get_bootstrap_server())


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


async def admin_execute(services: Services, statement: str) -> None:
    # A connection per statement: tests that restart PostgreSQL would otherwise
    # leave a long-lived admin session dead for the teardown.
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def template_database(services: Services) -> AsyncIterator[str]:
    """A migrated database built once per run; each test clones it."""
    name = f"convstats_template_{uuid.uuid4().hex[:12]}"
    await admin_execute(services, f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(with_database(services.database_url, name))
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        yield name
    finally:
        await admin_execute(services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(
    services: Services, template_database: str
) -> AsyncIterator[str]:
    name = f"convstats_test_{uuid.uuid4().hex[:12]}"
    await admin_execute(
        services, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'
    )
    try:
        yield with_database(services.database_url, name)
    finally:
        await admin_execute(services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(services: Services, database_url: str) -> settings_module.Settings:
    """Settings naming this test's own database, topics and consumer group."""
    suffix = uuid.uuid4().hex[:10]
    return settings_module.Settings(
        database_url=database_url,
        kafka_bootstrap_servers=services.kafka_bootstrap_servers,
        messages_topic=f"message-created-{suffix}",
        updates_topic=f"conversation-updated-{suffix}",
        dead_letter_topic=f"message-created-{suffix}.dlq",
        consumer_group=f"convstats-{suffix}",
        batch_wait_ms=50,
        relay_poll_interval_s=0.2,
        http_port=0,
        shutdown_timeout_s=10,
    )


@pytest.fixture
async def pool(settings: settings_module.Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(settings)
    try:
        yield pool
    finally:
        await pool.close()
