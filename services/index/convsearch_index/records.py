"""Datasets, items (with their image bytes and its digest) and collection definitions in
SQLite, WAL mode, synchronous=FULL: a committed write survives a crash. A collection's directory
is stored relative to the data dir, so a moved or copied data dir keeps working."""

import dataclasses
import hashlib
import itertools
import json
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY, description TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    dataset TEXT NOT NULL, id TEXT NOT NULL, label TEXT NOT NULL, metadata TEXT NOT NULL,
    image BLOB NOT NULL, digest TEXT NOT NULL DEFAULT '', image_size INTEGER, PRIMARY KEY (dataset, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_label ON items (dataset, label, id);
CREATE TABLE IF NOT EXISTS collections (
    dataset TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, directory TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (dataset, name));
CREATE TABLE IF NOT EXISTS attachments (
    dataset TEXT NOT NULL, collection TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (dataset, collection, key));
CREATE TABLE IF NOT EXISTS stale_vectors (
    dataset TEXT NOT NULL, collection TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (dataset, collection, id)) WITHOUT ROWID;
"""
_STALE = "INSERT OR IGNORE INTO stale_vectors VALUES (?, ?, ?)"
"""Notes that a collection (a damaged one, whose vectors no write reaches) may hold a vector of
an item deleted, or whose image was replaced, since: deleted when it next opens healthy."""
_SIZE = "COALESCE(image_size, length(image))"  # a follower stores items without their images
_MALFORMED = ("SELECT id FROM main.items WHERE dataset = ? AND (id = '' OR typeof(image) != 'blob' OR NOT "
              "json_valid(metadata) OR json_type(metadata) != 'object' OR "
              "EXISTS (SELECT 1 FROM json_each(metadata) WHERE type != 'text')) LIMIT 1")
"""The first item of a dataset that reads could not answer: an empty id, an image that is not
bytes, metadata that is not a JSON object of strings (only a forged snapshot holds one)."""


@dataclasses.dataclass
class ItemRecord:
    """One item as stored."""

    id: str
    label: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    image: bytes = b""
    digest: str = ""
    image_size: int = 0  # bytes of the stored image, known also when `image` is left out


def image_digest(image: bytes) -> str:
    """What identifies an image's bytes: the first 32 hex digits of their SHA-256."""
    return hashlib.sha256(image).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    """One dataset as stored, with its counts."""

    name: str
    description: str
    created_at: float
    item_count: int
    collection_count: int


class ItemSnapshot:
    """The items of a dataset as they were when it was made, without images, read page by page
    while writes go on: a read transaction on a connection of its own (WAL mode keeps its view).
    Rows are (id, label, metadata as JSON, digest, image_size) in id order, as
    Records.put_copied_items takes them: what a follower's copy of a dataset is made of. Close it
    (the WAL cannot be checkpointed past an open snapshot)."""

    def __init__(self, path: pathlib.Path, dataset: str):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("BEGIN")
            # Executing the query takes the read transaction's view: before this returns.
            self._cursor = self._db.execute(
                f"SELECT id, label, metadata, digest, {_SIZE} FROM items WHERE dataset = ? ORDER BY id", (dataset,))
        except BaseException:
            self._db.close()
            raise

    def pages(self, size: int) -> Iterator[list[tuple[str, str, str, str, int]]]:
        while rows := self._cursor.fetchmany(size):
            yield rows

    def close(self) -> None:
        self._db.close()


class Records:
    """The SQLite side of the index. One connection, serialised by a lock."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._add_digests()

    def _add_digests(self) -> None:
        """Gives items stored before digests existed theirs (once), and the image_size column
        (set only for a follower's items, stored without their images; NULL: length(image))."""
        columns = [row[1] for row in self._query("PRAGMA table_info(items)")]
        if "digest" not in columns:
            self._db.execute("ALTER TABLE items ADD COLUMN digest TEXT NOT NULL DEFAULT ''")
        if "image_size" not in columns:
            self._db.execute("ALTER TABLE items ADD COLUMN image_size INTEGER")
        while True:
            rows = self._query("SELECT dataset, id, image FROM items WHERE digest = '' LIMIT 500")
            if not rows:
                return
            self._transaction(("UPDATE items SET digest = ? WHERE dataset = ? AND id = ?",
                               (image_digest(bytes(image)), dataset, item_id)) for dataset, item_id, image in rows)

    def _query(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _transaction(self, statements: Iterable[tuple[str, Sequence]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- datasets ----------------------------------------------------------------------

    def create_dataset(self, name: str, description: str, created_at: float | None = None) -> None:
        self._transaction([("INSERT INTO datasets VALUES (?, ?, ?)",
                            (name, description, time.time() if created_at is None else created_at))])

    def dataset(self, name: str) -> DatasetRecord | None:
        rows = self._query(
            "SELECT name, description, created_at, "
            "(SELECT COUNT(*) FROM items WHERE dataset = d.name), "
            "(SELECT COUNT(*) FROM collections WHERE dataset = d.name) FROM datasets d WHERE name = ?", (name,))
        return DatasetRecord(*rows[0]) if rows else None

    def dataset_names(self) -> list[str]:
        return [row[0] for row in self._query("SELECT name FROM datasets ORDER BY name")]

    def delete_dataset(self, name: str) -> None:
        self._transaction([(f"DELETE FROM {table} WHERE {column} = ?", (name,))
                           for table, column in (("items", "dataset"), ("collections", "dataset"),
                                                 ("attachments", "dataset"), ("stale_vectors", "dataset"),
                                                 ("datasets", "name"))])

    # ---- items -------------------------------------------------------------------------

    def digests(self, dataset: str, ids: Sequence[str]) -> dict[str, str]:
        """Image digest of each of these items that exists."""
        found = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            found.update(self._query(f"SELECT id, digest FROM items WHERE dataset = ? AND id IN ({marks})",
                                     (dataset, *chunk)))
        return found

    def put_items(self, dataset: str, items: Sequence[ItemRecord], stale: Iterable[tuple[str, str]] = ()) -> None:
        """Upserts items (their digests computed here) in one transaction, which also notes the
        `stale` (collection, item id) pairs (see _STALE)."""
        self._transaction(itertools.chain(
            (("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
              (dataset, item.id, item.label, json.dumps(item.metadata, sort_keys=True), item.image,
               item.digest or image_digest(item.image), None if item.image else item.image_size or None))
             for item in items),
            ((_STALE, (dataset, collection, item_id)) for collection, item_id in stale)))

    def put_copied_items(self, dataset: str, rows: Iterable[tuple[str, str, str, str, int]]) -> None:
        """Stores items copied from another index, without images, in one transaction: rows of
        (id, label, metadata as JSON, digest, image_size), replacing any with the same id. Only
        for a dataset being copied whole (a follower's copy), which has no vectors to invalidate."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, x'', ?, ?)",
                                     ((dataset, *row) for row in rows))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def item_snapshot(self, dataset: str) -> "ItemSnapshot":
        """Every item of the dataset as it is now, read later page by page (see ItemSnapshot)."""
        return ItemSnapshot(self.path, dataset)

    def get_items(self, dataset: str, ids: Sequence[str], include_images: bool) -> dict[str, ItemRecord]:
        image = "image" if include_images else "x''"
        found = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT id, label, metadata, {image}, digest, {_SIZE} FROM items "
                                   f"WHERE dataset = ? AND id IN ({marks})", (dataset, *chunk)):
                found[row[0]] = ItemRecord(row[0], row[1], json.loads(row[2]), bytes(row[3]), row[4], row[5])
        return found

    def scan_items(self, dataset: str, after: str, limit: int, include_images: bool, label: str = ""
                   ) -> list[ItemRecord]:
        image = "image" if include_images else "x''"
        where = "dataset = ? AND id > ?" + (" AND label = ?" if label else "")
        args = (dataset, after, label) if label else (dataset, after)
        return [ItemRecord(row[0], row[1], json.loads(row[2]), bytes(row[3]), row[4], row[5]) for row in self._query(
            f"SELECT id, label, metadata, {image}, digest, {_SIZE} FROM items WHERE {where} ORDER BY id LIMIT ?",
            (*args, limit))]

    def labels(self, dataset: str) -> dict[str, str]:
        return dict(self._query("SELECT id, label FROM items WHERE dataset = ?", (dataset,)))

    def delete_items(self, dataset: str, ids: Sequence[str], stale_in: Sequence[str] = ()) -> list[str]:
        """Deletes the items that exist, noting their vectors stale in the collections
        `stale_in` (see _STALE); returns their ids."""
        present = list(self.get_items(dataset, ids, include_images=False))
        self._transaction(itertools.chain(
            (("DELETE FROM items WHERE dataset = ? AND id = ?", (dataset, i)) for i in present),
            ((_STALE, (dataset, collection, i)) for collection in stale_in for i in present)))
        return present

    # ---- collections -------------------------------------------------------------------

    def create_collection(self, dataset: str, name: str, spec: dict, directory: str) -> None:
        self._transaction([("INSERT INTO collections VALUES (?, ?, ?, ?, ?)",
                            (dataset, name, json.dumps(spec, sort_keys=True), directory, time.time()))])

    def collections(self) -> list[tuple[str, str, dict, str]]:
        """(dataset, name, spec, directory) of every collection."""
        return [(d, n, json.loads(s), path) for d, n, s, path in
                self._query("SELECT dataset, name, spec, directory FROM collections ORDER BY dataset, name")]

    def move_collection(self, dataset: str, name: str, directory: str) -> None:
        self._transaction([("UPDATE collections SET directory = ? WHERE dataset = ? AND name = ?",
                            (directory, dataset, name))])

    def delete_collection(self, dataset: str, name: str) -> None:
        self._transaction([(f"DELETE FROM {table} WHERE dataset = ? AND {column} = ?", (dataset, name))
                           for table, column in (("collections", "name"), ("attachments", "collection"),
                                                 ("stale_vectors", "collection"))])

    def stale_vectors(self, dataset: str, collection: str) -> list[str]:
        """The ids of the items whose vectors the collection may hold stale (see _STALE)."""
        return [row[0] for row in self._query("SELECT id FROM stale_vectors WHERE dataset = ? AND collection = ?",
                                              (dataset, collection))]

    def forget_stale_vectors(self, dataset: str, collection: str) -> None:
        """Drops the collection's notes of stale vectors, once those vectors are deleted."""
        self._transaction([("DELETE FROM stale_vectors WHERE dataset = ? AND collection = ?", (dataset, collection))])

    def put_attachment(self, dataset: str, collection: str, key: str, version: int, data: bytes) -> None:
        self._transaction([("INSERT OR REPLACE INTO attachments VALUES (?, ?, ?, ?, ?)",
                            (dataset, collection, key, version, data))])

    def attachments(self, dataset: str) -> list[tuple[str, str, int, bytes]]:
        """(collection, key, version, data) of every attachment of the dataset."""
        return [(c, k, v, bytes(d)) for c, k, v, d in self._query(
            "SELECT collection, key, version, data FROM attachments WHERE dataset = ?", (dataset,))]

    def attachment(self, dataset: str, collection: str, key: str) -> tuple[int, bytes] | None:
        rows = self._query("SELECT version, data FROM attachments WHERE dataset = ? AND collection = ? AND key = ?",
                           (dataset, collection, key))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def export_dataset(self, dataset: str, path: pathlib.Path) -> None:
        """Copies a dataset's rows, its stored results (attachments) included, into a new SQLite
        file (for snapshots)."""
        fresh = sqlite3.connect(path)
        fresh.executescript(_SCHEMA)
        fresh.close()
        with self._lock:
            self._db.execute("ATTACH DATABASE ? AS snapshot", (str(path),))
            try:
                for table, column in (("datasets", "name"), ("items", "dataset"), ("collections", "dataset"),
                                      ("attachments", "dataset")):
                    self._db.execute(f"INSERT INTO snapshot.{table} SELECT * FROM main.{table} WHERE {column} = ?",
                                     (dataset,))
            finally:
                self._db.execute("DETACH DATABASE snapshot")

    def import_dataset(self, path: pathlib.Path, source: str, target: str) -> None:
        """Copies the items and stored results (attachments) of dataset `source` from a snapshot
        file into dataset `target`, all or none: a snapshot file that fails SQLite's check, or
        its reading, adds nothing. The results keep their collections' versions, which the
        collections' checkpoints keep too."""
        if not path.is_file():  # ATTACH would make an empty database of a missing one
            raise sqlite3.DatabaseError("it holds no items file (records.sqlite)")
        with self._lock:
            self._db.execute("ATTACH DATABASE ? AS snapshot", (str(path),))
            try:
                problems = [row[0] for row in self._db.execute("PRAGMA snapshot.quick_check")]
                if problems != ["ok"]:
                    found = "; ".join(problems[:3]).replace("\n", "; ")
                    raise sqlite3.DatabaseError(f"its items fail SQLite's check: {found}")
                columns = [row[1] for row in self._db.execute("PRAGMA snapshot.table_info(items)")]
                digest = "digest" if "digest" in columns else "''"  # snapshots from before digests
                results = bool(self._db.execute("SELECT 1 FROM snapshot.sqlite_master WHERE name = 'attachments'")
                               .fetchall())  # snapshots from before stored results have none
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("INSERT INTO main.items (dataset, id, label, metadata, image, digest) "
                                     f"SELECT ?, id, label, metadata, image, {digest} "
                                     "FROM snapshot.items WHERE dataset = ?", (target, source))
                    if results:
                        self._db.execute("INSERT INTO main.attachments (dataset, collection, key, version, data) "
                                         "SELECT ?, collection, key, version, data FROM snapshot.attachments "
                                         "WHERE dataset = ?", (target, source))
                    malformed = self._db.execute(_MALFORMED, (target,)).fetchone()
                    if malformed:
                        raise sqlite3.DatabaseError(f"its item {malformed[0][:100]!r} has an empty id, an image "
                                                    "that is not bytes, or metadata not a JSON object of strings")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                self._db.execute("DETACH DATABASE snapshot")
        self._add_digests()

    def close(self) -> None:
        with self._lock:
            self._db.close()
