"""A service's life without its HTTP side: start, run until SIGTERM / SIGINT, stop, and the
shutdown of background tasks (common.service adds the servers; a worker process needs only this)."""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Awaitable, Callable, Iterable, Protocol

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


async def every(period: float, job: Callable[[], Awaitable[object]], logger: logging.Logger, event: str,
                running: Callable[[], bool] = lambda: True) -> None:
    """Run `job` every `period` seconds (start to start) while `running()`: a background loop of a
    service. A round that fails is logged as `event` and the job runs again next period."""
    while running():
        started = time.monotonic()
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed round is retried next period
            logger.warning(event, extra={"job": job.__name__, "error": str(exc)[:300]})
        await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
