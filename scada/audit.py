"""The tamper-evident audit log: who did what, to what, when and why, hash-chained.

Every entry's ``hash`` is the SHA-256 of the previous entry's hash and the entry's own content
(sequence number, time, tenant, actor, action, target, detail as canonical JSON). Appends take a
transaction-level advisory lock, so entries from several processes form one chain; the newest
(seq, hash) is also kept in ``audit_head``, so removing the tail is detected as well as editing or
deleting any entry. A trigger refuses UPDATE, DELETE and TRUNCATE on the table: tampering needs a
superuser who disables it first, and :meth:`AuditLog.verify` (``scada audit verify``) then finds it.

What is audited: logins (and failures), users, keys and kiosk tokens created or revoked, quota
changes, alarm acknowledgements and shelving, ledger restatements (data corrections) and catalog
changes at start-up. Anchor the head hash outside the database (``scada audit verify`` prints it)
to make even a rebuilt chain detectable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from scada.model import UTC

__all__ = ["GENESIS", "AuditEntry", "AuditLog", "AuditRecord", "AuditReport", "entry_hash"]

GENESIS: Final = "0" * 64
"""The ``prev_hash`` of the first entry."""
_LOCK_KEY: Final = 0x4155_4449  # "AUDI": serialises appends across processes


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit record."""

    seq: int
    at: datetime
    tenant: str | None
    actor: str
    action: str
    target: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """Return the entry as JSON-ready data (times in ISO 8601 UTC)."""
        return {
            "seq": self.seq,
            "at": self.at.astimezone(UTC).isoformat(),
            "tenant": self.tenant,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": dict(self.detail),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """What to append: who did what to what (the chain adds the sequence number, time and hashes)."""

    actor: str
    action: str
    target: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What :meth:`AuditLog.verify` found."""

    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problems: list[str]


def entry_hash(
    prev_hash: str,
    *,
    seq: int,
    at: datetime,
    tenant: str | None,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, Any],
) -> str:
    """Return the chained hash of an entry (hex SHA-256)."""
    content = json.dumps(
        [seq, at.astimezone(UTC).isoformat(timespec="microseconds"), tenant, actor, action, target, detail],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256((prev_hash + content).encode()).hexdigest()


def _row_entry(row: Any) -> AuditEntry:
    return AuditEntry(
        seq=row["seq"],
        at=row["at"],
        tenant=row["tenant_id"],
        actor=row["actor"],
        action=row["action"],
        target=row["target"],
        detail=json.loads(row["detail"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


class AuditLog:
    """Append to, read and verify the audit log in PostgreSQL (migration 007)."""

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def append(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, Any] | None = None,
        tenant: str | None = None,
        at: datetime | None = None,
    ) -> AuditEntry:
        """Append one entry to the chain and return it."""
        record = AuditRecord(actor=actor, action=action, target=target, detail=detail or {}, tenant=tenant)
        [entry] = await self.append_many([record], at=at)
        return entry

    async def note(self, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> None:
        """Append one entry; the positional form the control services take as their auditor."""
        await self.append(actor=actor, action=action, target=target, detail=detail)

    async def append_many(
        self, records: Sequence[AuditRecord], *, at: datetime | None = None
    ) -> list[AuditEntry]:
        """Append several entries of one action (same time) in one transaction; return them in order."""
        if not records:
            return []
        at = (at or datetime.now(UTC)).astimezone(UTC)
        # JSON round trip: the stored jsonb must hash the same as what we hash now.
        details: list[dict[str, Any]] = [json.loads(json.dumps(dict(r.detail), default=str)) for r in records]
        async with self._pool.acquire(timeout=self._timeout_s) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY, timeout=self._timeout_s)
            head = await conn.fetchrow(
                "SELECT seq, hash FROM audit_head WHERE id = 1", timeout=self._timeout_s
            )
            seq, prev = (head["seq"], head["hash"]) if head else (0, GENESIS)
            out: list[AuditEntry] = []
            for record, clean in zip(records, details, strict=True):
                seq += 1
                digest = entry_hash(
                    prev,
                    seq=seq,
                    at=at,
                    tenant=record.tenant,
                    actor=record.actor,
                    action=record.action,
                    target=record.target,
                    detail=clean,
                )
                out.append(
                    AuditEntry(
                        seq,
                        at,
                        record.tenant,
                        record.actor,
                        record.action,
                        record.target,
                        clean,
                        prev,
                        digest,
                    )
                )
                prev = digest
            await conn.executemany(
                """INSERT INTO audit_log (seq, at, tenant_id, actor, action, target, detail, prev_hash, hash)
                   VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9)""",
                [
                    (
                        e.seq,
                        e.at,
                        e.tenant,
                        e.actor,
                        e.action,
                        e.target,
                        json.dumps(e.detail, ensure_ascii=False),
                        e.prev_hash,
                        e.hash,
                    )
                    for e in out
                ],
                timeout=self._timeout_s,
            )
            await conn.execute(
                """INSERT INTO audit_head (id, seq, hash) VALUES (1, $1, $2)
                   ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash""",
                seq,
                prev,
                timeout=self._timeout_s,
            )
        return out

    async def entries(
        self,
        *,
        tenant: str | None,
        start: datetime | None = None,
        end: datetime | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """Return entries in sequence order (of one tenant, unless ``tenant`` is None: all)."""
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT * FROM audit_log
                   WHERE seq > $1 AND ($2::text IS NULL OR tenant_id = $2)
                     AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4)
                   ORDER BY seq LIMIT $5""",
                after_seq,
                tenant,
                start,
                end,
                limit,
                timeout=self._timeout_s,
            )
        return [_row_entry(r) for r in rows]

    async def verify(self, *, expect_head: str | None = None, batch: int = 10_000) -> AuditReport:
        """Walk the whole chain; report every edited, deleted or reordered entry and a cut tail."""
        problems: list[str] = []
        prev, expected_seq, count = GENESIS, 1, 0
        async with self._pool.acquire(timeout=self._timeout_s) as conn:
            head = await conn.fetchrow(
                "SELECT seq, hash FROM audit_head WHERE id = 1", timeout=self._timeout_s
            )
            after = 0
            while True:
                rows = await conn.fetch(
                    "SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                    after,
                    batch,
                    timeout=self._timeout_s * 4,
                )
                if not rows:
                    break
                for row in rows:
                    entry = _row_entry(row)
                    count += 1
                    if entry.seq != expected_seq:
                        problems.append(f"entries {expected_seq}..{entry.seq - 1} are missing (deleted)")
                    if entry.prev_hash != prev:
                        problems.append(f"entry {entry.seq}: does not follow the entry before it")
                    recomputed = entry_hash(
                        entry.prev_hash,
                        seq=entry.seq,
                        at=entry.at,
                        tenant=entry.tenant,
                        actor=entry.actor,
                        action=entry.action,
                        target=entry.target,
                        detail=entry.detail,
                    )
                    if recomputed != entry.hash:
                        problems.append(f"entry {entry.seq}: content changed after it was written")
                    prev, expected_seq = entry.hash, entry.seq + 1
                after = rows[-1]["seq"]
        head_seq, head_hash = (head["seq"], head["hash"]) if head else (0, GENESIS)
        if head_seq != expected_seq - 1 or head_hash != prev:
            problems.append(
                f"the log ends at entry {expected_seq - 1} but its head says {head_seq}: "
                "the newest entries were removed or the head was changed"
            )
        if expect_head is not None and expect_head != head_hash:
            problems.append(f"the head hash {head_hash[:16]}… is not the anchored {expect_head[:16]}…")
        return AuditReport(not problems, count, head_seq, head_hash, problems)


def export(entries: Sequence[AuditEntry], fmt: str) -> str:
    """Return entries as CSV or JSON (one document)."""
    if fmt == "json":
        return json.dumps([e.to_json() for e in entries], ensure_ascii=False, indent=1)
    if fmt != "csv":
        raise ValueError(f"format must be csv or json, not {fmt!r}")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["seq", "at", "tenant", "actor", "action", "target", "detail", "prev_hash", "hash"])
    for e in entries:
        row = e.to_json()
        writer.writerow(
            [
                row["seq"],
                row["at"],
                row["tenant"] or "",
                row["actor"],
                row["action"],
                row["target"],
                json.dumps(row["detail"], ensure_ascii=False, sort_keys=True),
                row["prev_hash"],
                row["hash"],
            ]
        )
    return out.getvalue()
