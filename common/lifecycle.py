"""A service's life without its HTTP side: start, run until SIGTERM / SIGINT, stop, and the
shutdown of background tasks (common.service adds the servers; a worker process needs only this)."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Iterable, Protocol

log = logging.getLogger("common.service")


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def drain_then_cancel(tasks: Iterable[asyncio.Task], grace_sec: float) -> None:
    """Shutdown: let running work end for `grace_sec`, then cancel what is left and wait for it."""
    tasks = list(tasks)
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_sec)
    await cancel_tasks(list(pending))


async def cancel_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancel a service's background tasks and wait until each has ended (how it ended is its own
    business: a task that failed was logged where it ran, and shutdown goes on)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve_until_signalled(service: Service) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    log.info("service_started")
    await stop.wait()
    log.info("service_stopping")
    await service.stop()
    log.info("service_stopped")
