"""Which engine processes which zone this cycle (contract: two replicas never both act on a zone).

A row per zone in `automation_zone_runs` (migration 0006): an engine claims a zone when nobody
holds it and either it ran the zone last itself or nobody has run it for at least `min_gap`;
the claim is one INSERT … ON CONFLICT DO UPDATE … WHERE for all zones, so PostgreSQL's row lock
decides between racing engines. The holder reads the zone's facts after claiming, so it sees
every command another engine committed before releasing.
"""
from __future__ import annotations

import datetime as dt

from common.db import Database

_CLAIM = """
INSERT INTO automation_zone_runs AS r (zone_id, owner, held_until, last_run_at)
SELECT z, $2, $3, $4 FROM unnest($1::bigint[]) z
ON CONFLICT (zone_id) DO UPDATE SET owner = EXCLUDED.owner, held_until = EXCLUDED.held_until,
                                    last_run_at = EXCLUDED.last_run_at
 WHERE (r.held_until IS NULL OR r.held_until < EXCLUDED.last_run_at)
   AND (r.owner = EXCLUDED.owner OR r.last_run_at <= $5)
RETURNING zone_id
"""


async def claim(db: Database, zone_ids: list[int], owner: str, now: dt.datetime, *, lease: dt.timedelta,
                min_gap: dt.timedelta) -> set[int]:
    if not zone_ids:
        return set()
    rows = await db.fetch(_CLAIM, sorted(zone_ids), owner, now + lease, now, now - min_gap)
    return {r["zone_id"] for r in rows}


async def release(db: Database, zone_ids: list[int], owner: str) -> None:
    """Rows are locked in zone order, as the claim takes them, so a release and another engine's claim
    never wait for each other in a circle."""
    if zone_ids:
        await db.execute("WITH locked AS (SELECT zone_id FROM automation_zone_runs WHERE owner = $1"
                         "                  AND zone_id = ANY($2) ORDER BY zone_id FOR UPDATE)"
                         " UPDATE automation_zone_runs r SET held_until = NULL FROM locked"
                         " WHERE r.zone_id = locked.zone_id AND r.owner = $1", owner, sorted(zone_ids))
