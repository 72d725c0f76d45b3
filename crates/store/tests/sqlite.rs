//! The SQLite backend against the shared conformance suite, plus what only a file can show:
//! durability across reopening and serialisation of concurrent writers.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use stratus_store::{conformance, Entry, SqliteStore, Store, StoreError, Txn};

/// A scratch directory unique to this process and test, removed when dropped.
struct TempDir {
    path: PathBuf,
    files: AtomicUsize,
}

impl TempDir {
    fn new() -> TempDir {
        static DIRS: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "stratus-store-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover from a crashed run with a recycled pid must not leak old data in.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path, files: AtomicUsize::new(0) }
    }

    /// A path for a store file that does not exist yet.
    fn fresh_file(&self) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        self.path.join(format!("store-{n}.db"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path).unwrap_or_else(|error| panic!("open {}: {error}", path.display()))
}

#[test]
fn conformance_suite() {
    let dir = TempDir::new();
    conformance::run_all(&mut || open(&dir.fresh_file()));
}

#[test]
fn a_new_file_starts_at_revision_zero() {
    let dir = TempDir::new();
    let store = open(&dir.fresh_file());
    assert_eq!(store.revision().unwrap(), 0);
    assert_eq!(store.put("k", b"v").unwrap(), 1, "the first write is revision 1");
}

#[test]
fn leases_and_history_survive_reopen() {
    let dir = TempDir::new();
    let path = dir.fresh_file();
    let (lease, first) = {
        let store = open(&path);
        let lease = store.grant_lease(Duration::from_secs(30)).unwrap();
        let first = store.txn(&Txn::new().put_leased("hosts/h1", b"up", lease)).unwrap();
        store.put("hosts/h2", b"up").unwrap();
        (lease, first)
    };
    let store = open(&path);
    store.keep_alive(lease).expect("a lease outlives a restart with its whole TTL");
    let watch = store.watch_from("hosts/", first - 1).unwrap();
    let replayed: Vec<String> = (0..2)
        .map(|_| watch.recv_timeout(Duration::from_secs(5)).unwrap().unwrap().key().to_string())
        .collect();
    assert_eq!(replayed, ["hosts/h1", "hosts/h2"], "history is kept in the file");
    store.revoke_lease(lease).unwrap();
    assert_eq!(store.get("hosts/h1").unwrap(), None, "the lease still owned its key after the restart");
}

#[test]
fn data_and_revisions_survive_reopen() {
    let dir = TempDir::new();
    let path = dir.fresh_file();
    let (kept, deleted_at) = {
        let store = open(&path);
        store.put("instances/i-1", b"running").unwrap();
        let kept = store.put("instances/i-2", b"stopped").unwrap();
        store.put("instances/i-3", b"gone").unwrap();
        assert!(store.delete("instances/i-3").unwrap());
        (kept, store.revision().unwrap())
    };

    let store = open(&path);
    assert_eq!(store.revision().unwrap(), deleted_at, "revision survives, deletes included");
    assert_eq!(
        store.get("instances/i-2").unwrap(),
        Some(Entry { key: "instances/i-2".to_string(), value: b"stopped".to_vec(), revision: kept })
    );
    assert_eq!(store.get("instances/i-3").unwrap(), None);
    assert_eq!(store.list("instances/").unwrap().len(), 2);
    assert_eq!(
        store.put("instances/i-4", b"new").unwrap(),
        deleted_at + 1,
        "revisions continue where they left off"
    );
}

#[test]
fn concurrent_cas_loses_no_update() {
    const THREADS: usize = 8;
    const INCREMENTS: usize = 25;

    let dir = TempDir::new();
    let store = Arc::new(open(&dir.fresh_file()));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                for _ in 0..INCREMENTS {
                    loop {
                        let current = store.get("counter").unwrap();
                        let (expected, count) = match &current {
                            Some(entry) => (
                                Some(entry.revision),
                                std::str::from_utf8(&entry.value).unwrap().parse().unwrap(),
                            ),
                            None => (None, 0u64),
                        };
                        let next = (count + 1).to_string();
                        match store.compare_and_swap("counter", expected, Some(next.as_bytes())) {
                            Ok(_) => break,
                            // Another thread won this round; retry from a fresh read.
                            Err(StoreError::Conflict { .. }) => continue,
                            Err(error) => panic!("CAS failed: {error}"),
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker panicked");
    }

    let counter = store.get("counter").unwrap().expect("counter exists");
    assert_eq!(counter.value, (THREADS * INCREMENTS).to_string().into_bytes());
    // Only successful CASes write, so the revision counts increments exactly.
    assert_eq!(store.revision().unwrap(), (THREADS * INCREMENTS) as u64);
}

#[test]
fn watch_ends_when_store_is_dropped() {
    let dir = TempDir::new();
    let store = open(&dir.fresh_file());
    let watch = store.watch("").unwrap();
    drop(store);

    let started = Instant::now();
    assert!(watch.recv_timeout(Duration::from_secs(30)).is_none());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "recv_timeout must return at once when the store is gone, not wait out the timeout"
    );
    assert!(watch.try_recv().is_none());
}

#[test]
fn open_reports_unusable_path() {
    let dir = TempDir::new();
    let path = dir.path.join("no-such-dir").join("store.db");
    match SqliteStore::open(&path) {
        Err(StoreError::Backend(message)) => {
            assert!(message.contains("no-such-dir"), "message names the path: {message}")
        }
        other => panic!("expected a Backend error, got {other:?}"),
    }
}

#[test]
fn store_is_object_safe_and_shareable() {
    let dir = TempDir::new();
    let store: Arc<dyn Store> = Arc::new(open(&dir.fresh_file()));
    let writer = {
        let store = Arc::clone(&store);
        thread::spawn(move || store.put("k", b"v").unwrap())
    };
    let revision = writer.join().unwrap();
    assert_eq!(store.get("k").unwrap().map(|e| e.revision), Some(revision));
}
