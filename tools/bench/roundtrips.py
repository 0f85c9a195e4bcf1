"""Counting the database round trips of the code under benchmark, a figure the machine's load
does not change: every statement asyncpg sends on a connection of a `common.db.Database` pool
(queries, BEGIN / COMMIT, and the pool's reset query when a connection is released)."""
from __future__ import annotations

import common.db


class RoundTrips:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, record) -> None:  # an asyncpg query logger
        self.count += 1


COUNTER = RoundTrips()


def install() -> RoundTrips:
    """Count on every pool connection opened from now on; call before `Database.connect()`."""
    original = common.db._init_connection
    if getattr(original, "counts_round_trips", False):
        return COUNTER

    async def init(conn) -> None:
        await original(conn)
        conn.add_query_logger(COUNTER)
    init.counts_round_trips = True
    common.db._init_connection = init
    return COUNTER
