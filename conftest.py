"""Root test harness: service isolation at collection, a fresh migrated database per test,
settings with their own topic root / Redis prefix / client ids, and an MQTT probe.

Every service folder runs with its own folder first on sys.path (as `python main.py` does);
pytest imports each service's test modules with that folder first and with the other
services' same-named modules (`main`, ...) forgotten, so one run collects all of them.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent
SERVICE_DIRS = [ROOT / d for d in ("mqtt-bridge", "history-logger", "automation-engine", "scheduler",
                                   "device-registry")]
sys.path.insert(0, str(ROOT))

from common import testing  # noqa: E402
from common.db import Database  # noqa: E402
from common.migrate import apply_migrations  # noqa: E402
from common.mqtt import MqttClient  # noqa: E402


def _service_dir(path: Path) -> Path | None:
    for service in SERVICE_DIRS:
        if service in path.parents:
            return service
    return None


def _local_module_names() -> set[str]:
    names = set()
    for service in SERVICE_DIRS:
        if service.is_dir():
            for entry in service.iterdir():
                if entry.suffix == ".py" and not entry.name.startswith("test_") and entry.name != "conftest.py":
                    names.add(entry.stem)
                elif entry.is_dir() and (entry / "__init__.py").exists():
                    names.add(entry.name)
    return names


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    service = _service_dir(Path(module_path))
    if service is None:
        return None
    for name in _local_module_names():
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
    for other in SERVICE_DIRS:
        while str(other) in sys.path:
            sys.path.remove(str(other))
    sys.path.insert(0, str(service))
    return None


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
