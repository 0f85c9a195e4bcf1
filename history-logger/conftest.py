"""history-logger's fixtures (helpers the tests import are in testing.py)."""
import pytest

from common.testing import drop_redis_keys

from testing import fast_settings, start_logger


@pytest.fixture
async def logger(settings):
    """The service running in this process on the test's settings, subscribed."""
    s = fast_settings(settings)
    service = await start_logger(s)
    yield service
    await service.stop()
    await drop_redis_keys(s)
