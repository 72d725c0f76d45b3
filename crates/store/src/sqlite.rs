//! The SQLite backend: one file, one connection, durable on every acknowledged write.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, ToSql, TransactionBehavior};

use crate::{
    prefix_successor, validate_key, validate_prefix, Entry, Event, Revision, Store, StoreError, Watch,
};

/// The schema this code writes; kept in `PRAGMA user_version` so a newer file is refused rather
/// than misread.
const SCHEMA_VERSION: i64 = 1;

/// How long a write waits for another process holding the file's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `kv` holds the live keys; `meta` holds the store revision on its own because deletes must
/// still advance it after the key's row is gone.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS kv (
        key      TEXT    NOT NULL PRIMARY KEY,
        value    BLOB    NOT NULL,
        revision INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta (
        id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 0),
        revision INTEGER NOT NULL
    );
    INSERT OR IGNORE INTO meta (id, revision) VALUES (0, 0);
";

/// A [`Store`] in a single SQLite file.
///
/// Writes run in `IMMEDIATE` transactions in WAL mode with `synchronous=FULL`, so a revision
/// returned to a caller survives a crash or power loss. Watchers only see writes made through
/// this `SqliteStore`, not through other connections to the same file.
pub struct SqliteStore {
    path: PathBuf,
    /// Lock order: `conn` before `watchers`. Writers notify while still holding `conn`, which
    /// is what keeps events in revision order across threads.
    conn: Mutex<Connection>,
    watchers: Mutex<Vec<Watcher>>,
}

/// One subscriber of [`Store::watch`].
struct Watcher {
    prefix: String,
    events: Sender<Event>,
}

/// What a committed (or skipped) write did, for the public methods to report.
struct Applied {
    /// The store revision after the write.
    revision: Revision,
    /// Whether anything changed; deleting an absent key does not.
    changed: bool,
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and schema if missing.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let context = |what: &str| format!("{what} {}", path.display());
        let conn = Connection::open(path).map_err(backend(&context("opening")))?;
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

        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(backend(&context("reading schema version of")))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{}: schema version {version} is newer than supported version {SCHEMA_VERSION}",
                context("opening")
            )));
        }
        conn.execute_batch(SCHEMA).map_err(backend(&context("creating schema in")))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(backend(&context("writing schema version to")))?;

        Ok(SqliteStore { path: path.to_path_buf(), conn: Mutex::new(conn), watchers: Mutex::new(Vec::new()) })
    }

    /// Locks the connection. A poisoned lock is taken over: rusqlite rolls back any open
    /// transaction when it unwinds, so the connection is still consistent.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the watcher list; see [`SqliteStore::conn`] for why poisoning is ignored.
    fn watchers(&self) -> MutexGuard<'_, Vec<Watcher>> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The single write path: checks `expected` if given (`Some(None)` = must be absent), then
    /// stores `value` or deletes the key, commits, and notifies watchers.
    fn apply(
        &self,
        key: &str,
        expected: Option<Option<Revision>>,
        value: Option<&[u8]>,
    ) -> Result<Applied, StoreError> {
        validate_key(key)?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("beginning write"))?;

        let actual = tx
            .query_row("SELECT revision FROM kv WHERE key = ?1", [key], |row| row.get::<_, i64>(0))
            .optional()
            .map_err(backend("reading key revision"))?
            .map(to_revision)
            .transpose()?;
        if let Some(expected) = expected {
            if expected != actual {
                return Err(StoreError::Conflict { key: key.to_string(), expected, actual });
            }
        }

        let current = read_revision(&tx)?;
        if value.is_none() && actual.is_none() {
            // Nothing to delete: no revision bump and no event, as in etcd.
            return Ok(Applied { revision: current, changed: false });
        }

        let revision = current + 1;
        let stored = from_revision(revision)?;
        tx.execute("UPDATE meta SET revision = ?1 WHERE id = 0", [stored])
            .map_err(backend("advancing store revision"))?;
        let event = match value {
            Some(value) => {
                tx.execute(
                    "INSERT INTO kv (key, value, revision) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                                                     revision = excluded.revision",
                    params![key, value, stored],
                )
                .map_err(backend("writing key"))?;
                Event::Put(Entry { key: key.to_string(), value: value.to_vec(), revision })
            }
            None => {
                tx.execute("DELETE FROM kv WHERE key = ?1", [key]).map_err(backend("deleting key"))?;
                Event::Delete { key: key.to_string(), revision }
            }
        };
        tx.commit().map_err(backend("committing write"))?;

        // Still under the connection lock, so no later revision can be sent before this one.
        self.notify(&event);
        Ok(Applied { revision, changed: true })
    }

    /// Sends `event` to every watcher whose prefix covers its key, forgetting watchers whose
    /// `Watch` was dropped.
    fn notify(&self, event: &Event) {
        let key = match event {
            Event::Put(entry) => &entry.key,
            Event::Delete { key, .. } => key,
        };
        self.watchers().retain(|watcher| {
            !key.starts_with(&watcher.prefix) || watcher.events.send(event.clone()).is_ok()
        });
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store for SqliteStore {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        validate_key(key)?;
        self.conn()
            .query_row("SELECT key, value, revision FROM kv WHERE key = ?1", [key], row_to_entry)
            .optional()
            .map_err(backend("reading key"))?
            .transpose()
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<Revision, StoreError> {
        Ok(self.apply(key, None, Some(value))?.revision)
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.apply(key, None, None)?.changed)
    }

    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: Option<&[u8]>,
    ) -> Result<Revision, StoreError> {
        Ok(self.apply(key, Some(expected), value)?.revision)
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        validate_prefix(prefix)?;
        // A range rather than LIKE: keys contain '%' and '_', and the range uses the index.
        let upper = prefix_successor(prefix);
        let conn = self.conn();
        let (sql, bounds): (&str, Vec<&dyn ToSql>) = match &upper {
            Some(upper) => (
                "SELECT key, value, revision FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key",
                vec![&prefix, upper],
            ),
            None => ("SELECT key, value, revision FROM kv WHERE key >= ?1 ORDER BY key", vec![&prefix]),
        };
        let mut statement = conn.prepare_cached(sql).map_err(backend("preparing list"))?;
        let rows = statement.query_map(bounds.as_slice(), row_to_entry).map_err(backend("listing keys"))?;
        rows.map(|row| row.map_err(backend("listing keys"))?).collect()
    }

    fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        validate_prefix(prefix)?;
        let (sender, receiver) = mpsc::channel();
        // Registering under the connection lock places the watch exactly between two
        // revisions: it sees every later write and none that was already committed.
        let _conn = self.conn();
        self.watchers().push(Watcher { prefix: prefix.to_string(), events: sender });
        Ok(Watch::new(receiver))
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        read_revision(&self.conn())
    }
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
        assert_eq!(store.watchers().len(), 3);

        store.put("a/1", b"x").unwrap();
        // The dropped one is pruned on its first missed event; the "b/" one was not due one.
        assert_eq!(store.watchers().len(), 2);
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
}
