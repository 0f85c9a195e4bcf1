"""Fixtures of the automation-engine tests: a fake Laravel, the engine's settings, an engine on the test database."""
from __future__ import annotations

import pytest

from actions import Services
from common.topics import Topics
from config_source import ConfigLoader
from engine import Engine
from settings import ServiceSettings
from testing import FakeLaravel


@pytest.fixture
async def laravel():
    server = FakeLaravel()
    await server.server.start()
    yield server
    await server.server.stop()


@pytest.fixture
def options(settings) -> ServiceSettings:
    return ServiceSettings.from_env(settings, {}).replace(refusal_alert_cycles=3)


@pytest.fixture
async def make_engine(settings, db, mqtt, options):
    """make_engine(laravel_url=None, **option_changes) → an Engine on the test database."""
    loaders: list[ConfigLoader] = []

    def make(laravel_url: str | None = "", owner: str | None = None, controllers=None, **changes) -> Engine:
        s = settings.replace(laravel_api_url=laravel_url or "", laravel_api_token="1|secret",
                             laravel_http_timeout_sec=3.0)
        services = Services(db, mqtt, Topics(s.mqtt_topic_root), s, options.replace(**changes))
        loader = ConfigLoader(s, db)
        loaders.append(loader)
        return Engine(services, loader, owner=owner, controllers=controllers)

    yield make
    for loader in loaders:
        await loader.close()
