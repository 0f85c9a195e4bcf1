"""Fixtures of the registry's tests: the running service, an HTTP client with the token, a test "node"."""
from __future__ import annotations

import httpx
import pytest

from testing import TOKEN, FakeNode, start_registry


@pytest.fixture
async def registry(settings, db):
    service = await start_registry(settings)
    yield service
    await service.stop()


@pytest.fixture
async def api(registry):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{registry.settings.registry_port}",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=20) as client:
        yield client


@pytest.fixture
def node(settings):
    return FakeNode(settings)
