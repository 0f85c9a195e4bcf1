"""The Redis client of a caller whose writes are not idempotent never sends a write twice."""
from __future__ import annotations

import pytest

from common import testing
from common.redis_client import REDIS_TRANSIENT, key, redis_client


async def _incr_through(proxy: testing.ReplyLosingProxy, client, name: str) -> None:
    proxy.armed = True
    pipe = client.pipeline(transaction=True)
    pipe.incr(name)
    await pipe.execute()


async def test_a_transaction_whose_reply_is_lost_is_not_sent_again(settings):
    name = key(settings, "lost-reply")
    async with testing.ReplyLosingProxy(settings.redis_host, settings.redis_port, name.encode()) as proxy:
        through = settings.replace(redis_port=proxy.port)
        once, resending = redis_client(through, resend=False), redis_client(through)
        try:
            with pytest.raises(REDIS_TRANSIENT):
                await _incr_through(proxy, once, name)
            assert proxy.dropped == 1
            assert int(await once.get(name)) == 1  # applied, exactly once; the caller asks, as the logger does

            # What redis-py does by default (and why the logger's client must not): the lost reply
            # makes it send the transaction again, which applies it a second time.
            await _incr_through(proxy, resending, name)
            assert proxy.dropped == 2
            assert int(await once.get(name)) == 3
        finally:
            await once.delete(name)
            await once.aclose()
            await resending.aclose()
