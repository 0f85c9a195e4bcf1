"""node uid → (node id, zone id, validated), refreshed every 60 s; all misses of a batch in ONE query.

A uid the database does not know is remembered as unknown for a few seconds only, so a node
registered a moment ago is found again quickly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from common.db import Database

TTL_SEC = 60.0
UNKNOWN_TTL_SEC = 5.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: int
    zone_id: int | None
    validated: bool


class NodeCache:
    def __init__(self, db: Database, ttl: float = TTL_SEC, unknown_ttl: float = UNKNOWN_TTL_SEC):
        self.db = db
        self.ttl = ttl
        self.unknown_ttl = unknown_ttl
        self._entries: dict[str, tuple[float, NodeInfo | None]] = {}
        self.queries = 0

    async def resolve(self, uids: Iterable[str]) -> dict[str, NodeInfo]:
        now = time.monotonic()
        found: dict[str, NodeInfo] = {}
        missing = []
        for uid in uids:
            cached = self._entries.get(uid)
            if cached is not None and cached[0] > now:
                if cached[1] is not None:
                    found[uid] = cached[1]
            else:
                missing.append(uid)
        if missing:
            self.queries += 1
            rows = await self.db.fetch("SELECT uid, id, zone_id, validated FROM nodes WHERE uid = ANY($1::text[])",
                                       missing)
            if len(self._entries) > 100_000:
                self._entries.clear()
            for row in rows:
                info = NodeInfo(row["id"], row["zone_id"], row["validated"])
                self._entries[row["uid"]] = (now + self.ttl, info)
                found[row["uid"]] = info
            for uid in missing:
                if uid not in found:
                    self._entries[uid] = (now + self.unknown_ttl, None)
        return found

    def forget(self, uid: str) -> None:
        self._entries.pop(uid, None)
