"""Durable state: one SQLite file (WAL) under the state root, shared by every `cowctl` and every
container monitor. Writers take `BEGIN IMMEDIATE`, so two controllers acting on one container are
serialised, and a status is written before the action it announces (the *intent*), so recovery
can tell what was half done. A database that is corrupt or newer than this code is refused with a
one-line error and never reset."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle.errors import CtlError, NotFound
from lifecycle.states import Status

__all__ = ["Store", "Container", "Image", "SCHEMA_VERSION", "now_iso", "ZERO_TIME"]

SCHEMA_VERSION = 1
ZERO_TIME = "0001-01-01T00:00:00Z"

_SCHEMA = """
CREATE TABLE layers (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, files INTEGER NOT NULL, created TEXT NOT NULL
);
CREATE TABLE images (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, tag TEXT NOT NULL, created TEXT NOT NULL,
    config TEXT NOT NULL, UNIQUE (name, tag)
);
CREATE TABLE image_layers (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, digest TEXT NOT NULL REFERENCES layers(digest),
    PRIMARY KEY (image_id, position)
);
CREATE TABLE containers (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, image_id TEXT NOT NULL REFERENCES images(id),
    config TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER NOT NULL DEFAULT 0,
    monitor_pid INTEGER NOT NULL DEFAULT 0, monitor_start INTEGER NOT NULL DEFAULT 0,
    daemon_pid INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT NOT NULL,
    restart_count INTEGER NOT NULL DEFAULT 0, manually_stopped INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time_ns INTEGER NOT NULL, type TEXT NOT NULL,
    action TEXT NOT NULL, actor_id TEXT NOT NULL, attributes TEXT NOT NULL
);
"""


def now_iso(t: float | None = None) -> str:
    """RFC 3339 with nanoseconds, UTC, as Docker prints StartedAt/FinishedAt."""
    ns = time.time_ns() if t is None else int(t * 1e9)
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def split_ref(ref: str) -> tuple[str, str]:
    """`name[:tag]` -> (name, tag), the tag defaulting to `latest` as in Docker."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag or not name:
        return ref, "latest"
    return name, tag


@dataclass
class Image:
    id: str
    name: str
    tag: str
    created: str
    config: dict[str, Any]
    layers: list[str] = field(default_factory=list)  # digests, bottom first

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass
class Container:
    id: str
    name: str
    image_id: str
    config: dict[str, Any]
    status: Status
    pid: int
    monitor_pid: int
    monitor_start: int
    daemon_pid: int
    exit_code: int
    error: str
    created: str
    started_at: str
    finished_at: str
    restart_count: int
    manually_stopped: bool
    generation: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Container:
        d = dict(row)
        d["config"] = json.loads(d["config"])
        d["status"] = Status(d["status"])
        d["manually_stopped"] = bool(d["manually_stopped"])
        return cls(**d)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "state.db"
        self.layers_dir = root / "layers"
        self.containers_dir = root / "containers"
        try:
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root, 0o700)
            self.layers_dir.mkdir(exist_ok=True)
            self.containers_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise CtlError(f"cannot use state root {root}: {e.strerror}") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.execute("PRAGMA foreign_keys = ON")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.DatabaseError(f"cannot switch to WAL (journal mode {mode})")
            self._check_schema()
        except sqlite3.DatabaseError as e:
            raise CtlError(
                f"state database {self.path} is unreadable ({e}); it was left untouched: "
                "move it away to start from an empty state"
            ) from None

    def _check_schema(self) -> None:
        with self.tx():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise sqlite3.DatabaseError("not a cowctl database")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise CtlError(
                    f"state database {self.path} has schema version {version}, newer than this "
                    f"cowctl understands ({SCHEMA_VERSION}); use a newer cowctl"
                )
            self.db.execute("SELECT id, status FROM containers LIMIT 1").fetchall()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so that read-then-write cannot race."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -------------------------------------------------------------- paths

    def container_dir(self, cid: str) -> Path:
        return self.containers_dir / cid

    def layer_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.layers_dir / algo / hexd

    # -------------------------------------------------------------- events

    def event(self, type_: str, action: str, actor: str, **attrs: Any) -> None:
        self.db.execute(
            "INSERT INTO events (time_ns, type, action, actor_id, attributes) VALUES (?,?,?,?,?)",
            (time.time_ns(), type_, action, actor, json.dumps(attrs, sort_keys=True)),
        )

    def event_tx(self, type_: str, action: str, actor: str, **attrs: Any) -> None:
        with self.tx():
            self.event(type_, action, actor, **attrs)

    def last_exit_code(self, cid: str) -> int | None:
        r = self.db.execute(
            "SELECT attributes FROM events WHERE actor_id = ? AND action = 'die' "
            "ORDER BY seq DESC LIMIT 1",
            (cid,),
        ).fetchone()
        return None if r is None else int(json.loads(r[0]).get("exitCode", 0))

    def events_after(self, seq: int) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM events WHERE seq > ? ORDER BY seq", (seq,)).fetchall()

    # -------------------------------------------------------------- layers and images

    def add_layer(self, digest: str, size: int, files: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO layers (digest, size, files, created) VALUES (?,?,?,?)",
            (digest, size, files, now_iso()),
        )

    def layers(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM layers ORDER BY created").fetchall()

    def images(self) -> list[Image]:
        rows = self.db.execute("SELECT * FROM images ORDER BY created DESC").fetchall()
        return [self._image(r) for r in rows]

    def _image(self, r: sqlite3.Row) -> Image:
        layers = [
            x[0]
            for x in self.db.execute(
                "SELECT digest FROM image_layers WHERE image_id = ? ORDER BY position", (r["id"],)
            )
        ]
        return Image(r["id"], r["name"], r["tag"], r["created"], json.loads(r["config"]), layers)

    def find_image(self, ref: str) -> Image:
        """By name[:tag] (tag defaults to latest), full id, or unique id prefix."""
        name, tag = split_ref(ref)
        r = self.db.execute(
            "SELECT * FROM images WHERE name = ? AND tag = ?", (name, tag)
        ).fetchone()
        if r is None:
            key = ref.removeprefix("sha256:")
            rows = self.db.execute(
                "SELECT * FROM images WHERE substr(id, 8) LIKE ? || '%'", (key,)
            ).fetchall()
            if len(rows) == 1 and len(key) >= 1:
                r = rows[0]
            elif len(rows) > 1:
                raise CtlError(f"image id prefix {ref!r} is ambiguous")
        if r is None:
            raise NotFound(f"No such image: {ref}")
        return self._image(r)

    def add_image(self, image: Image) -> None:
        self.db.execute(
            "INSERT INTO images (id, name, tag, created, config) VALUES (?,?,?,?,?)",
            (image.id, image.name, image.tag, image.created, json.dumps(image.config)),
        )
        for i, d in enumerate(image.layers):
            self.db.execute(
                "INSERT INTO image_layers (image_id, position, digest) VALUES (?,?,?)",
                (image.id, i, d),
            )

    def remove_image(self, image: Image) -> list[str]:
        """Drops the image; returns the digests no image uses any more (to delete from disk)."""
        self.db.execute("DELETE FROM image_layers WHERE image_id = ?", (image.id,))
        self.db.execute("DELETE FROM images WHERE id = ?", (image.id,))
        orphans = [
            r[0]
            for r in self.db.execute(
                "SELECT digest FROM layers WHERE digest NOT IN (SELECT digest FROM image_layers)"
            )
        ]
        for d in orphans:
            self.db.execute("DELETE FROM layers WHERE digest = ?", (d,))
        return orphans

    # -------------------------------------------------------------- containers

    def containers(self) -> list[Container]:
        rows = self.db.execute("SELECT * FROM containers ORDER BY created DESC").fetchall()
        return [Container.from_row(r) for r in rows]

    def get(self, cid: str) -> Container:
        r = self.db.execute("SELECT * FROM containers WHERE id = ?", (cid,)).fetchone()
        if r is None:
            raise NotFound(f"No such container: {cid}")
        return Container.from_row(r)

    def find(self, ref: str) -> Container:
        """Docker's lookup order: full id, then exact name, then unique id prefix."""
        r = self.db.execute(
            "SELECT * FROM containers WHERE id = ? OR name = ? ORDER BY id = ? DESC",
            (ref, ref.removeprefix("/"), ref),
        ).fetchone()
        if r is None and ref and all(c in "0123456789abcdef" for c in ref):
            rows = self.db.execute(
                "SELECT * FROM containers WHERE id LIKE ? || '%'", (ref,)
            ).fetchall()
            if len(rows) > 1:
                raise CtlError(f"multiple containers found with provided prefix: {ref}")
            r = rows[0] if rows else None
        if r is None:
            raise NotFound(f"No such container: {ref}")
        return Container.from_row(r)

    def name_taken(self, name: str) -> str | None:
        r = self.db.execute("SELECT id FROM containers WHERE name = ?", (name,)).fetchone()
        return None if r is None else r[0]

    def insert(self, c: Container) -> None:
        self.db.execute(
            "INSERT INTO containers (id, name, image_id, config, status, created, started_at, "
            "finished_at) VALUES (?,?,?,?,?,?,?,?)",
            (
                c.id,
                c.name,
                c.image_id,
                json.dumps(c.config),
                c.status.value,
                c.created,
                c.started_at,
                c.finished_at,
            ),
        )

    def update(self, cid: str, **fields: Any) -> None:
        if "status" in fields:
            fields["status"] = Status(fields["status"]).value
        if "manually_stopped" in fields:
            fields["manually_stopped"] = int(bool(fields["manually_stopped"]))
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE containers SET {cols} WHERE id = ?", (*fields.values(), cid))

    def delete(self, cid: str) -> None:
        self.db.execute("DELETE FROM containers WHERE id = ?", (cid,))

    def image_users(self, image_id: str) -> list[str]:
        return [
            r[0]
            for r in self.db.execute("SELECT id FROM containers WHERE image_id = ?", (image_id,))
        ]
