"""Root test harness: a fresh migrated database per test, settings with their own topic root /
Redis prefix / client ids, and an MQTT probe.

Each service imports its modules by their plain names from its own folder (as `python main.py` does),
so one pytest process holds one service: `make test` runs one pytest per service folder (and one each
for `common/` and `tests/`), and a run given several service folders stops with a usage error.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import pytest

# Helpers that tests assert through show the compared values too, as assertions in test files do.
pytest.register_assert_rewrite("common.testing", "testing", "tests.stack")

from common import testing  # noqa: E402
from common.db import Database  # noqa: E402
from common.migrate import apply_migrations  # noqa: E402
from common.mqtt import MqttClient  # noqa: E402

ROOT = Path(__file__).resolve().parent
SERVICE_DIRS = [ROOT / d for d in ("mqtt-bridge", "history-logger", "automation-engine", "scheduler",
                                   "device-registry")]


def pytest_configure(config: pytest.Config) -> None:
    paths = [Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args]
    services = {s.name for s in SERVICE_DIRS for p in paths if p == s or s in p.parents or p in s.parents}
    if len(services) > 1:
        raise pytest.UsageError(f"one service per pytest run (these share module names): {sorted(services)};"
                                " `make test` runs each in its own process")


_reruns: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        _reruns.append(report)


def pytest_terminal_summary(terminalreporter) -> None:
    """A test that passed on its rerun keeps the failure of its first attempt readable in the log."""
    for report in _reruns:
        terminalreporter.write_sep("-", f"first attempt of {report.nodeid} ({report.when})")
        terminalreporter.write_line(report.longreprtext[-4000:])


# ---------------------------------------------------------------------------------------
# Databases: one migrated template per flavour and run, a copy of it per test
# ---------------------------------------------------------------------------------------
def _admin_kwargs() -> dict:
    env = testing.SHARED_ENV
    return dict(host=env["PG_HOST"], port=int(env["PG_PORT"]), user=env["PG_USER"],
                password=env["PG_PASS"] or None, database="postgres")


async def _drop_stale_databases(conn: asyncpg.Connection) -> None:
    """Databases left by runs whose process is gone (named hydro_<kind>_<pid>_...)."""
    for row in await conn.fetch("SELECT datname FROM pg_database WHERE datname ~ '^hydro_(tpl|t)_[0-9]+_'"):
        pid = int(row["datname"].split("_")[2])
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')


async def _build_template(name: str, flavour: str) -> None:
    if flavour == "laravel-first":
        conn = await asyncpg.connect(**dict(_admin_kwargs(), database=name))
        try:
            await conn.execute(testing.LARAVEL_SCHEMA.read_text())
        finally:
            await conn.close()  # the dump empties search_path for its own session
    conn = await asyncpg.connect(**dict(_admin_kwargs(), database=name))
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session", params=["own-schema", "laravel-first"])
def pg_template(request) -> str:
    """Every database test runs on both: our migrations alone, and Laravel's schema then ours."""
    flavour = request.param
    if flavour == "laravel-first" and not testing.LARAVEL_SCHEMA.is_file():
        pytest.skip(f"{testing.LARAVEL_SCHEMA} is missing: no Laravel-first database to test on")
    name = f"hydro_tpl_{os.getpid()}_{testing.unique_id('')}"

    async def create():
        admin = await asyncpg.connect(**_admin_kwargs())
        try:
            await _drop_stale_databases(admin)
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await _build_template(name, flavour)

    asyncio.run(create())
    yield name

    async def drop():
        admin = await asyncpg.connect(**_admin_kwargs())
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(drop())


@pytest.fixture
async def pg_database(pg_template) -> str:
    """A fresh database, a copy of the migrated template, dropped after the test."""
    name = f"hydro_t_{os.getpid()}_{testing.unique_id('')}"
    admin = await asyncpg.connect(**_admin_kwargs())
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    finally:
        await admin.close()
    yield name
    admin = await asyncpg.connect(**_admin_kwargs())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def settings(pg_database):
    """Settings on the shared servers: own database, topic root, Redis prefix and client ids."""
    return testing.isolated_settings(PG_DB=pg_database)


@pytest.fixture
async def db(settings):
    database = Database(settings)
    await database.connect()
    yield database
    await database.close()


@pytest.fixture
async def mqtt(settings):
    """A connected MqttClient for the test (clean session: nothing is left on the broker)."""
    client = MqttClient(settings, "-test", clean_session=True)
    await client.start(wait=10)
    yield client
    await client.stop()


@pytest.fixture
def mqtt_probe(settings):
    """Subscribed to everything under this test's topic root before the test publishes."""
    probe = testing.MqttProbe(settings.mqtt_host, settings.mqtt_port, f"{settings.mqtt_topic_root}/#")
    yield probe
    probe.close()
