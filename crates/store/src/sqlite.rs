//! The SQLite backend: one file, one connection, durable on every acknowledged write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, ToSql, Transaction, TransactionBehavior};

use crate::{
    prefix_successor, ttl_seconds, validate_key, validate_prefix, Entry, Event, LeaseId, Listing, Op,
    Revision, Store, StoreError, Txn, Watch, WatchItem,
};

/// The schema this code writes; kept in `PRAGMA user_version` so a newer file is refused rather
/// than misread. Version 1 (no history, no leases) is upgraded in place.
const SCHEMA_VERSION: i64 = 2;

/// How long a write waits for another process holding the file's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many revisions of history watches can start from; older ones are compacted away as
/// writes go on (etcd deployments keep a similar window with auto-compaction).
const HISTORY: Revision = 10_000;

/// How often the lease reaper looks for expired leases.
const REAP_EVERY: Duration = Duration::from_millis(100);

/// `kv` holds the live keys; `meta` the store revision (deletes must still advance it after
/// the key's row is gone), the first revision `log` still has and the next lease id; `log`
/// every change (a NULL value is a delete) for watches that start in the past; `leases` the
/// live leases with their TTL in seconds.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS kv (
        key      TEXT    NOT NULL PRIMARY KEY,
        value    BLOB    NOT NULL,
        revision INTEGER NOT NULL,
        lease    INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta (
        id         INTEGER NOT NULL PRIMARY KEY CHECK (id = 0),
        revision   INTEGER NOT NULL,
        compacted  INTEGER NOT NULL DEFAULT 1,
        next_lease INTEGER NOT NULL DEFAULT 1
    );
    INSERT OR IGNORE INTO meta (id, revision) VALUES (0, 0);
    CREATE TABLE IF NOT EXISTS log (
        revision INTEGER NOT NULL,
        key      TEXT    NOT NULL,
        value    BLOB,
        PRIMARY KEY (revision, key)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS leases (
        id  INTEGER NOT NULL PRIMARY KEY,
        ttl INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
";

/// Version 1 to 2: leases on keys, the history's start (none was kept: it starts after the
/// current revision) and lease ids. `SCHEMA` then creates the new tables.
const UPGRADE_FROM_1: &str = "
    ALTER TABLE kv ADD COLUMN lease INTEGER;
    ALTER TABLE meta ADD COLUMN compacted INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE meta ADD COLUMN next_lease INTEGER NOT NULL DEFAULT 1;
    UPDATE meta SET compacted = revision + 1;
";

/// A [`Store`] in a single SQLite file.
///
/// Writes run in `IMMEDIATE` transactions in WAL mode with `synchronous=FULL`, so a revision
/// returned to a caller survives a crash or power loss. Watchers only see writes made through
/// this `SqliteStore`, not through other connections to the same file. Lease deadlines live in
/// memory: a reopened store gives every lease its whole TTL again (as etcd does after a leader
/// change), so a restart never expires a lease early.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Lock order: `conn`, then `watchers`, then `leases`. Writers notify while still holding
    /// `conn`, which is what keeps events in revision order across threads.
    conn: Mutex<Connection>,
    watchers: Mutex<Vec<Watcher>>,
    /// Live leases: TTL and deadline.
    leases: Mutex<HashMap<LeaseId, (Duration, Instant)>>,
}

/// One subscriber of [`Store::watch`].
struct Watcher {
    prefix: String,
    events: Sender<WatchItem>,
}

/// What a committed (or skipped) write did, for the public methods to report.
struct Applied {
    /// The store revision after the write.
    revision: Revision,
    /// How many keys it deleted.
    deleted: usize,
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and schema if missing (or upgrading an
    /// older one), and starts the thread that expires leases.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let context = |what: &str| format!("{what} {}", path.display());
        let mut conn = Connection::open(path).map_err(backend(&context("opening")))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(backend(&context("setting busy timeout on")))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(backend(&context("enabling WAL on")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "{}: journal mode is {mode:?}, WAL is required",
                context("opening")
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend(&context("setting synchronous=FULL on")))?;

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend(&context("locking")))?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(backend(&context("reading schema version of")))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{}: schema version {version} is newer than supported version {SCHEMA_VERSION}",
                context("opening")
            )));
        }
        if version == 1 {
            tx.execute_batch(UPGRADE_FROM_1).map_err(backend(&context("upgrading schema of")))?;
        }
        tx.execute_batch(SCHEMA).map_err(backend(&context("creating schema in")))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(backend(&context("writing schema version to")))?;
        let leases = {
            let mut statement =
                tx.prepare("SELECT id, ttl FROM leases").map_err(backend(&context("reading leases of")))?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))
                .map_err(backend(&context("reading leases of")))?;
            let now = Instant::now();
            let mut leases = HashMap::new();
            for row in rows {
                let (id, ttl) = row.map_err(backend(&context("reading leases of")))?;
                let ttl = Duration::from_secs(ttl.max(1) as u64);
                leases.insert(id, (ttl, now + ttl));
            }
            leases
        };
        tx.commit().map_err(backend(&context("committing schema of")))?;

        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            watchers: Mutex::new(Vec::new()),
            leases: Mutex::new(leases),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("store-leases".into())
            .spawn(move || reap_leases(weak))
            .map_err(|error| StoreError::Backend(format!("starting the lease thread: {error}")))?;
        Ok(SqliteStore { inner })
    }
}

/// Ends expired leases until the store is dropped.
fn reap_leases(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(REAP_EVERY);
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> =
            inner.leases().iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(id, _)| *id).collect();
        for lease in expired {
            // A failure (the file's lock held elsewhere) is retried on the next round.
            let _ = inner.end_lease(lease);
        }
    }
}

impl Inner {
    /// Locks the connection. A poisoned lock is taken over: rusqlite rolls back any open
    /// transaction when it unwinds, so the connection is still consistent.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the watcher list; see [`Inner::conn`] for why poisoning is ignored.
    fn watchers(&self) -> MutexGuard<'_, Vec<Watcher>> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the lease deadlines; see [`Inner::conn`] for why poisoning is ignored.
    fn leases(&self) -> MutexGuard<'_, HashMap<LeaseId, (Duration, Instant)>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The single write path: checks the transaction's compares, applies its writes at one new
    /// revision (none if nothing changes), records them in the history, commits and notifies.
    fn apply(&self, txn: &Txn) -> Result<Applied, StoreError> {
        txn.validate()?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("beginning write"))?;

        for (key, expected) in &txn.compares {
            let actual = key_revision(&tx, key)?;
            if *expected != actual {
                return Err(StoreError::Conflict { key: key.clone(), expected: *expected, actual });
            }
        }
        for op in &txn.ops {
            if let Op::Put { lease: Some(lease), .. } = op {
                if !self.lease_alive(*lease) {
                    return Err(StoreError::LeaseExpired(*lease));
                }
            }
        }

        let current = read_revision(&tx)?;
        let revision = current + 1;
        let stored = from_revision(revision)?;
        let mut events = Vec::new();
        let mut deleted = 0;
        for op in &txn.ops {
            match op {
                Op::Put { key, value, lease } => {
                    tx.execute(
                        "INSERT INTO kv (key, value, revision, lease) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                                                         revision = excluded.revision,
                                                         lease = excluded.lease",
                        params![key, value, stored, lease],
                    )
                    .map_err(backend("writing key"))?;
                    events.push(Event::Put(Entry { key: key.clone(), value: value.clone(), revision }));
                }
                Op::Delete { key } => {
                    if tx.execute("DELETE FROM kv WHERE key = ?1", [key]).map_err(backend("deleting key"))?
                        > 0
                    {
                        deleted += 1;
                        events.push(Event::Delete { key: key.clone(), revision });
                    }
                }
            }
        }
        if events.is_empty() {
            // Nothing changed (only deletes of absent keys): no revision bump, no event, as in etcd.
            return Ok(Applied { revision: current, deleted: 0 });
        }
        self.commit(tx, revision, events)?;
        Ok(Applied { revision, deleted })
    }

    /// Records `events` (all at `revision`) in the history, advances the store revision,
    /// compacts old history now and then, commits, and notifies watchers (in key order, as a
    /// watch replaying the history sees them).
    fn commit(
        &self,
        tx: Transaction<'_>,
        revision: Revision,
        mut events: Vec<Event>,
    ) -> Result<(), StoreError> {
        let stored = from_revision(revision)?;
        events.sort_by(|a, b| a.key().cmp(b.key()));
        for event in &events {
            let value = match event {
                Event::Put(entry) => Some(&entry.value),
                Event::Delete { .. } => None,
            };
            tx.execute(
                "INSERT INTO log (revision, key, value) VALUES (?1, ?2, ?3)",
                params![stored, event.key(), value],
            )
            .map_err(backend("recording history"))?;
        }
        tx.execute("UPDATE meta SET revision = ?1 WHERE id = 0", [stored])
            .map_err(backend("advancing store revision"))?;
        if revision > HISTORY && revision.is_multiple_of(1000) {
            compact_history(&tx, revision - HISTORY)?;
        }
        tx.commit().map_err(backend("committing write"))?;
        // Still under the connection lock, so no later revision can be sent before this one.
        for event in &events {
            self.notify(event);
        }
        Ok(())
    }

    /// Sends `event` to every watcher whose prefix covers its key, forgetting watchers whose
    /// `Watch` was dropped.
    fn notify(&self, event: &Event) {
        let key = event.key();
        self.watchers().retain(|watcher| {
            !key.starts_with(&watcher.prefix) || watcher.events.send(Ok(event.clone())).is_ok()
        });
    }

    /// Whether `lease` exists and has not passed its deadline.
    fn lease_alive(&self, lease: LeaseId) -> bool {
        self.leases().get(&lease).is_some_and(|(_, deadline)| *deadline > Instant::now())
    }

    /// Ends `lease`: deletes it and its keys in one write. Unknown leases change nothing.
    fn end_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("beginning lease end"))?;
        let keys: Vec<String> = {
            let mut statement = tx
                .prepare_cached("SELECT key FROM kv WHERE lease = ?1")
                .map_err(backend("reading lease keys"))?;
            let rows =
                statement.query_map([lease], |row| row.get(0)).map_err(backend("reading lease keys"))?;
            rows.collect::<Result<_, _>>().map_err(backend("reading lease keys"))?
        };
        tx.execute("DELETE FROM leases WHERE id = ?1", [lease]).map_err(backend("deleting lease"))?;
        tx.execute("DELETE FROM kv WHERE lease = ?1", [lease]).map_err(backend("deleting lease keys"))?;
        if keys.is_empty() {
            tx.commit().map_err(backend("committing lease end"))?;
        } else {
            let revision = read_revision(&tx)? + 1;
            let events = keys.into_iter().map(|key| Event::Delete { key, revision }).collect();
            self.commit(tx, revision, events)?;
        }
        self.leases().remove(&lease);
        Ok(())
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl Store for SqliteStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        validate_key(key)?;
        self.inner
            .conn()
            .query_row("SELECT key, value, revision FROM kv WHERE key = ?1", [key], row_to_entry)
            .optional()
            .map_err(backend("reading key"))?
            .transpose()
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.inner.apply(&Txn::new().delete(key))?.deleted > 0)
    }

    fn txn(&self, txn: &Txn) -> Result<Revision, StoreError> {
        Ok(self.inner.apply(txn)?.revision)
    }

    fn range(&self, prefix: &str) -> Result<Listing, StoreError> {
        validate_prefix(prefix)?;
        let conn = self.inner.conn();
        let entries = select_range(
            &conn,
            "SELECT key, value, revision FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key",
            "SELECT key, value, revision FROM kv WHERE key >= ?1 ORDER BY key",
            prefix,
            &[],
            row_to_entry,
        )?;
        Ok(Listing { entries, revision: read_revision(&conn)? })
    }

    fn watch_from(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        validate_prefix(prefix)?;
        let (sender, receiver) = mpsc::channel();
        // Replaying and registering under the connection lock places the watch exactly between
        // two revisions: it sees every write after `after` once.
        let conn = self.inner.conn();
        let compacted = to_revision(
            conn.query_row("SELECT compacted FROM meta WHERE id = 0", [], |row| row.get(0))
                .map_err(backend("reading history start"))?,
        )?;
        if after + 1 < compacted {
            return Err(StoreError::Compacted { requested: after + 1, compacted });
        }
        let after = from_revision(after)?;
        let history = select_range(
            &conn,
            "SELECT key, value, revision FROM log WHERE revision > ?3 AND key >= ?1 AND key < ?2
             ORDER BY revision, key",
            "SELECT key, value, revision FROM log WHERE revision > ?2 AND key >= ?1 ORDER BY revision, key",
            prefix,
            &[&after],
            |row| {
                let key: String = row.get(0)?;
                let value: Option<Vec<u8>> = row.get(1)?;
                let revision: i64 = row.get(2)?;
                Ok(to_revision(revision).map(|revision| match value {
                    Some(value) => Event::Put(Entry { key, value, revision }),
                    None => Event::Delete { key, revision },
                }))
            },
        )?;
        for event in history {
            // The receiver is still here; a send cannot fail.
            let _ = sender.send(Ok(event));
        }
        self.inner.watchers().push(Watcher { prefix: prefix.to_string(), events: sender });
        Ok(Watch::new(receiver))
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        read_revision(&self.inner.conn())
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = ttl_seconds(ttl)?;
        let mut conn = self.inner.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("beginning lease grant"))?;
        let id: LeaseId = tx
            .query_row("SELECT next_lease FROM meta WHERE id = 0", [], |row| row.get(0))
            .map_err(backend("reading next lease id"))?;
        tx.execute("UPDATE meta SET next_lease = ?1 WHERE id = 0", [id + 1])
            .map_err(backend("advancing next lease id"))?;
        tx.execute("INSERT INTO leases (id, ttl) VALUES (?1, ?2)", [id, seconds])
            .map_err(backend("storing lease"))?;
        tx.commit().map_err(backend("committing lease grant"))?;
        let ttl = Duration::from_secs(seconds as u64);
        self.inner.leases().insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut leases = self.inner.leases();
        match leases.get_mut(&lease) {
            Some((ttl, deadline)) if *deadline > now => {
                *deadline = now + *ttl;
                Ok(())
            }
            // Past its deadline: the reaper deletes it (and its keys) within a round.
            _ => Err(StoreError::LeaseExpired(lease)),
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.end_lease(lease)
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut conn = self.inner.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("beginning compaction"))?;
        let current = read_revision(&tx)?;
        if revision > current {
            return Err(StoreError::Invalid(format!(
                "cannot compact to revision {revision}: the store is at {current}"
            )));
        }
        compact_history(&tx, revision)?;
        tx.commit().map_err(backend("committing compaction"))
    }
}

/// Drops the history before `revision` (never moving its start backwards).
fn compact_history(tx: &Transaction<'_>, revision: Revision) -> Result<(), StoreError> {
    let stored = from_revision(revision)?;
    tx.execute("DELETE FROM log WHERE revision < ?1", [stored]).map_err(backend("compacting history"))?;
    tx.execute("UPDATE meta SET compacted = max(compacted, ?1) WHERE id = 0", [stored])
        .map_err(backend("recording compaction"))?;
    Ok(())
}

/// Runs a query over the keys starting with `prefix`: `bounded` binds ?1 = prefix and ?2 = its
/// successor, `unbounded` (for prefixes without one) binds ?1 only; `extra` follows them. A
/// range rather than LIKE: keys contain '%' and '_', and the range uses the index.
fn select_range<T>(
    conn: &Connection,
    bounded: &str,
    unbounded: &str,
    prefix: &str,
    extra: &[&dyn ToSql],
    decode: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<Result<T, StoreError>>,
) -> Result<Vec<T>, StoreError> {
    let upper = prefix_successor(prefix);
    let mut bounds: Vec<&dyn ToSql> = vec![&prefix];
    let sql = match &upper {
        Some(upper) => {
            bounds.push(upper);
            bounded
        }
        None => unbounded,
    };
    bounds.extend_from_slice(extra);
    let mut statement = conn.prepare_cached(sql).map_err(backend("preparing range"))?;
    let rows = statement.query_map(bounds.as_slice(), decode).map_err(backend("reading range"))?;
    rows.map(|row| row.map_err(backend("reading range"))?).collect()
}

/// The revision of `key`'s last change, `None` if absent.
fn key_revision(tx: &Transaction<'_>, key: &str) -> Result<Option<Revision>, StoreError> {
    tx.query_row("SELECT revision FROM kv WHERE key = ?1", [key], |row| row.get::<_, i64>(0))
        .optional()
        .map_err(backend("reading key revision"))?
        .map(to_revision)
        .transpose()
}

/// Reads the store-wide revision from `meta`.
fn read_revision(conn: &Connection) -> Result<Revision, StoreError> {
    let stored = conn
        .query_row("SELECT revision FROM meta WHERE id = 0", [], |row| row.get::<_, i64>(0))
        .map_err(backend("reading store revision"))?;
    to_revision(stored)
}

/// Decodes a row of `SELECT key, value, revision`; the inner `Result` carries a bad revision.
fn row_to_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Entry, StoreError>> {
    let key: String = row.get(0)?;
    let value: Vec<u8> = row.get(1)?;
    let revision: i64 = row.get(2)?;
    Ok(to_revision(revision).map(|revision| Entry { key, value, revision }))
}

/// SQLite integers are signed; a negative revision can only come from a damaged file.
fn to_revision(stored: i64) -> Result<Revision, StoreError> {
    Revision::try_from(stored)
        .map_err(|_| StoreError::Backend(format!("corrupt store: negative revision {stored}")))
}

/// The inverse of [`to_revision`]; fails only after 2^63 writes.
fn from_revision(revision: Revision) -> Result<i64, StoreError> {
    i64::try_from(revision)
        .map_err(|_| StoreError::Backend(format!("store revision {revision} overflows SQLite")))
}

/// Wraps a rusqlite error as [`StoreError::Backend`], saying what was being done.
fn backend(doing: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |error| StoreError::Backend(format!("{doing}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file path that is removed (with its WAL files) when dropped.
    struct ScratchFile(PathBuf);

    impl ScratchFile {
        fn new(name: &str) -> ScratchFile {
            let path =
                std::env::temp_dir().join(format!("stratus-store-unit-{}-{name}.db", std::process::id()));
            ScratchFile(path)
        }
    }

    impl Drop for ScratchFile {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = self.0.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    #[test]
    fn dropped_watchers_are_forgotten() {
        let file = ScratchFile::new("dropped-watchers");
        let store = SqliteStore::open(&file.0).unwrap();
        let kept = store.watch("a/").unwrap();
        drop(store.watch("a/").unwrap());
        let _other_prefix = store.watch("b/").unwrap();
        assert_eq!(store.inner.watchers().len(), 3);

        store.put("a/1", b"x").unwrap();
        // The dropped one is pruned on its first missed event; the "b/" one was not due one.
        assert_eq!(store.inner.watchers().len(), 2);
        assert!(kept.try_recv().is_some());
    }

    #[test]
    fn newer_schema_is_refused() {
        let file = ScratchFile::new("newer-schema");
        drop(SqliteStore::open(&file.0).unwrap());
        let conn = Connection::open(&file.0).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(conn);

        let error = SqliteStore::open(&file.0).unwrap_err();
        assert!(error.to_string().contains("schema version"), "unexpected error: {error}");
    }

    #[test]
    fn version_1_files_are_upgraded() {
        let file = ScratchFile::new("upgrade");
        let conn = Connection::open(&file.0).unwrap();
        conn.execute_batch(
            "CREATE TABLE kv (key TEXT NOT NULL PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL)
                 WITHOUT ROWID;
             CREATE TABLE meta (id INTEGER NOT NULL PRIMARY KEY CHECK (id = 0), revision INTEGER NOT NULL);
             INSERT INTO meta (id, revision) VALUES (0, 7);
             INSERT INTO kv (key, value, revision) VALUES ('instances/a', X'78', 7);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);

        let store = SqliteStore::open(&file.0).unwrap();
        assert_eq!(
            store.get("instances/a").unwrap().map(|e| (e.value, e.revision)),
            Some((b"x".to_vec(), 7))
        );
        // No history was kept before: watching from before the upgrade is refused, from it is not.
        assert!(matches!(store.watch_from("", 3), Err(StoreError::Compacted { compacted: 8, .. })));
        let watch = store.watch_from("", 7).unwrap();
        assert_eq!(store.put("instances/b", b"y").unwrap(), 8);
        assert_eq!(watch.recv_timeout(Duration::from_secs(5)).unwrap().unwrap().revision(), 8);
    }
}
