//! The behaviour every [`Store`] backend must share, as an executable suite.
//!
//! Backends call [`run_all`] from their own tests. The suite only uses the public trait, and it
//! never assumes that watch events arrive before a write returns (an etcd watch is
//! asynchronous): absence of an event is always checked by ordering, never by a short wait.

use std::fmt::Debug;
use std::time::Duration;

use crate::{Entry, Event, Revision, Store, StoreError, Watch};

/// How long to wait for an event that must arrive; generous because CI machines are slow.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One named check; it gets a fresh empty store.
type Case = fn(&dyn Store);

/// The shared test suite every backend must pass (a future etcd backend will call it too).
/// `make` returns a fresh empty store each call. Panics (assert) on the first failure with a clear message.
pub fn run_all<S: Store>(make: &mut dyn FnMut() -> S) {
    let cases: &[(&str, Case)] = &[
        ("empty_store", empty_store),
        ("put_then_get", put_then_get),
        ("revisions_are_store_wide", revisions_are_store_wide),
        ("overwrite_changes_revision", overwrite_changes_revision),
        ("delete_reports_existence", delete_reports_existence),
        ("cas_create_if_absent", cas_create_if_absent),
        ("cas_stale_revision", cas_stale_revision),
        ("cas_delete", cas_delete),
        ("list_prefix_boundaries", list_prefix_boundaries),
        ("list_sorted", list_sorted),
        ("watch_prefix", watch_prefix),
        ("watch_everything", watch_everything),
        ("watch_many", watch_many),
        ("invalid_keys", invalid_keys),
    ];
    for (name, case) in cases {
        let store = make();
        // The case name is the first thing a failure needs, and assert messages cannot carry it.
        eprintln!("store conformance: {name}");
        case(&store);
    }
}

/// Unwraps `result`, failing with what was being done.
fn ok<T>(result: Result<T, StoreError>, doing: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{doing} failed: {error}"),
    }
}

/// Asserts that `result` is exactly this [`StoreError::Conflict`].
fn assert_conflict<T: Debug>(
    result: Result<T, StoreError>,
    key: &str,
    expected: Option<Revision>,
    actual: Option<Revision>,
    doing: &str,
) {
    match result {
        Err(StoreError::Conflict {
            key: got_key,
            expected: got_expected,
            actual: got_actual,
        }) => assert_eq!(
            (got_key.as_str(), got_expected, got_actual),
            (key, expected, actual),
            "{doing}: conflict reports (key, expected, actual) wrongly"
        ),
        other => panic!(
            "{doing}: expected Conflict {{ key: {key:?}, expected: {expected:?}, actual: {actual:?} }}, got {other:?}"
        ),
    }
}

/// Receives the next event, failing if none arrives in time.
fn next_event(watch: &Watch, waiting_for: &str) -> Event {
    match watch.recv_timeout(EVENT_TIMEOUT) {
        Some(event) => event,
        None => panic!("no event within {EVENT_TIMEOUT:?} while waiting for {waiting_for}"),
    }
}

/// The expected event for a put.
fn put_event(key: &str, value: &[u8], revision: Revision) -> Event {
    Event::Put(Entry { key: key.to_string(), value: value.to_vec(), revision })
}

/// The expected event for a delete.
fn delete_event(key: &str, revision: Revision) -> Event {
    Event::Delete { key: key.to_string(), revision }
}

/// The keys of a listing, for readable comparisons.
fn keys(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|entry| entry.key.as_str()).collect()
}

fn empty_store(store: &dyn Store) {
    assert_eq!(ok(store.revision(), "revision"), 0, "a new store is at revision 0");
    assert_eq!(ok(store.get("missing"), "get missing"), None, "get of a missing key");
    assert_eq!(ok(store.list(""), "list all"), vec![], "a new store lists nothing");
}

fn put_then_get(store: &dyn Store) {
    let revision = ok(store.put("k", b"v"), "put k");
    assert_eq!(
        ok(store.get("k"), "get k"),
        Some(Entry { key: "k".to_string(), value: b"v".to_vec(), revision }),
        "get returns what put stored, at put's revision"
    );

    // Values are opaque bytes: empty, NUL and non-UTF-8 must round-trip.
    for (key, value) in [("empty", &b""[..]), ("binary", &[0, 0xff, 0, 0x80][..])] {
        let revision = ok(store.put(key, value), "put opaque value");
        let entry = ok(store.get(key), "get opaque value");
        assert_eq!(
            entry.map(|entry| (entry.value, entry.revision)),
            Some((value.to_vec(), revision)),
            "value {value:?} round-trips"
        );
    }
}

fn revisions_are_store_wide(store: &dyn Store) {
    assert_eq!(ok(store.put("a", b"1"), "put a"), 1, "first write is revision 1");
    assert_eq!(ok(store.put("b", b"1"), "put b"), 2, "each write adds one");
    assert_eq!(ok(store.put("a", b"2"), "put a again"), 3, "each write adds one");
    assert_eq!(ok(store.revision(), "revision"), 3);
    assert_eq!(ok(store.get("b"), "get b").map(|e| e.revision), Some(2));
    assert!(ok(store.delete("a"), "delete a"), "a existed");
    assert_eq!(ok(store.revision(), "revision"), 4, "a delete is a write");
    assert!(!ok(store.delete("a"), "delete a again"), "a is gone");
    assert_eq!(ok(store.revision(), "revision"), 4, "deleting a missing key writes nothing");
    assert_eq!(ok(store.put("c", b"1"), "put c"), 5, "revisions never repeat after a delete");
}

fn overwrite_changes_revision(store: &dyn Store) {
    let first = ok(store.put("k", b"one"), "put k");
    let second = ok(store.put("k", b"two"), "overwrite k");
    assert!(second > first, "overwrite must raise the revision ({first} -> {second})");
    assert_eq!(
        ok(store.get("k"), "get k").map(|e| (e.value, e.revision)),
        Some((b"two".to_vec(), second)),
        "get sees the overwrite"
    );
    assert_eq!(ok(store.list(""), "list").len(), 1, "overwrite does not duplicate the key");
}

fn delete_reports_existence(store: &dyn Store) {
    assert!(!ok(store.delete("k"), "delete missing"), "missing key did not exist");
    ok(store.put("k", b"v"), "put k");
    assert!(ok(store.delete("k"), "delete k"), "k existed");
    assert_eq!(ok(store.get("k"), "get deleted"), None, "deleted key is gone");
    assert_eq!(ok(store.list(""), "list"), vec![], "deleted key is not listed");
    assert!(!ok(store.delete("k"), "delete k again"), "k no longer exists");
}

fn cas_create_if_absent(store: &dyn Store) {
    let created = ok(store.compare_and_swap("lock", None, Some(b"me")), "CAS create of absent key");
    assert_eq!(created, ok(store.revision(), "revision"), "CAS returns the new store revision");
    assert_eq!(
        ok(store.get("lock"), "get lock").map(|e| (e.value, e.revision)),
        Some((b"me".to_vec(), created))
    );
    assert_conflict(
        store.compare_and_swap("lock", None, Some(b"you")),
        "lock",
        None,
        Some(created),
        "second CAS create",
    );
    assert_eq!(
        ok(store.get("lock"), "get lock").map(|e| e.value),
        Some(b"me".to_vec()),
        "a failed CAS changes nothing"
    );
    assert_eq!(ok(store.revision(), "revision"), created, "a failed CAS writes nothing");
}

fn cas_stale_revision(store: &dyn Store) {
    let stale = ok(store.put("k", b"1"), "put k");
    let current = ok(store.put("k", b"2"), "put k again");
    assert_conflict(
        store.compare_and_swap("k", Some(stale), Some(b"3")),
        "k",
        Some(stale),
        Some(current),
        "CAS with a stale revision",
    );
    assert_eq!(
        ok(store.get("k"), "get k").map(|e| (e.value, e.revision)),
        Some((b"2".to_vec(), current)),
        "a failed CAS changes nothing"
    );
    assert_eq!(ok(store.revision(), "revision"), current, "a failed CAS writes nothing");

    let swapped = ok(store.compare_and_swap("k", Some(current), Some(b"3")), "CAS with the current revision");
    assert_eq!(swapped, current + 1, "a successful CAS is one write");
    assert_eq!(ok(store.get("k"), "get k").map(|e| (e.value, e.revision)), Some((b"3".to_vec(), swapped)));

    assert_conflict(
        store.compare_and_swap("absent", Some(swapped), Some(b"x")),
        "absent",
        Some(swapped),
        None,
        "CAS expecting a revision of an absent key",
    );
    assert_eq!(ok(store.get("absent"), "get absent"), None);
}

fn cas_delete(store: &dyn Store) {
    let revision = ok(store.put("k", b"v"), "put k");
    assert_conflict(
        store.compare_and_swap("k", Some(revision + 100), None),
        "k",
        Some(revision + 100),
        Some(revision),
        "CAS delete with a wrong revision",
    );
    assert!(ok(store.get("k"), "get k").is_some(), "a failed CAS delete keeps the key");

    let deleted = ok(store.compare_and_swap("k", Some(revision), None), "CAS delete");
    assert_eq!(deleted, revision + 1, "a CAS delete is one write");
    assert_eq!(ok(store.get("k"), "get k"), None, "CAS delete removed the key");
    assert_conflict(
        store.compare_and_swap("k", Some(revision), None),
        "k",
        Some(revision),
        None,
        "CAS delete of an already deleted key",
    );
    assert_eq!(
        ok(store.compare_and_swap("k", None, None), "CAS delete of absent key expected absent"),
        deleted,
        "deleting an absent key as expected succeeds without writing"
    );
    assert_eq!(ok(store.revision(), "revision"), deleted);
}

fn list_prefix_boundaries(store: &dyn Store) {
    // Neighbours of "a/" in byte order ("a", "a.", "a0") and LIKE wildcards must not leak in.
    let all = [
        "a", "a.", "a/", "a/%", "a/1", "a/2/x", "a/_", "a0", "a%/1", "a_/1", "ab/1", "b/1", "é/1", "é/2", "ê",
    ];
    for key in all {
        ok(store.put(key, key.as_bytes()), "put");
    }
    let cases: &[(&str, &[&str])] = &[
        ("a/", &["a/", "a/%", "a/1", "a/2/x", "a/_"]),
        ("a/1", &["a/1"]),
        ("a/2", &["a/2/x"]),
        ("a%", &["a%/1"]),
        ("a_", &["a_/1"]),
        ("a/%", &["a/%"]),
        ("b/", &["b/1"]),
        ("é/", &["é/1", "é/2"]),
        ("z", &[]),
        ("a/1/", &[]),
    ];
    for (prefix, expected) in cases {
        let listed = ok(store.list(prefix), "list");
        assert_eq!(keys(&listed), *expected, "list({prefix:?})");
    }

    let mut sorted = all.to_vec();
    sorted.sort_unstable();
    assert_eq!(keys(&ok(store.list(""), "list all")), sorted, "list(\"\") lists every key");
}

fn list_sorted(store: &dyn Store) {
    let mut expected = Vec::new();
    for key in ["n/3", "n/10", "n/1", "n/2/b", "n/2", "n/2/a", "n/Z", "n/z"] {
        let revision = ok(store.put(key, key.as_bytes()), "put");
        expected.push(Entry { key: key.to_string(), value: key.as_bytes().to_vec(), revision });
    }
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        ok(store.list("n/"), "list n/"),
        expected,
        "list returns full entries sorted by key (byte order)"
    );
}

fn watch_prefix(store: &dyn Store) {
    ok(store.put("a/old", b"0"), "put before watch");
    let watch = ok(store.watch("a/"), "watch a/");

    ok(store.put("b/1", b"x"), "put outside prefix");
    let put = ok(store.put("a/1", b"1"), "put a/1");
    ok(store.put("a0", b"x"), "put neighbour key");
    ok(store.put("a", b"x"), "put key equal to prefix minus slash");
    assert!(!ok(store.delete("a/missing"), "delete missing"), "a/missing never existed");
    assert_conflict(
        store.compare_and_swap("a/1", None, Some(b"y")),
        "a/1",
        None,
        Some(put),
        "conflicting CAS",
    );
    let deleted = ok(store.compare_and_swap("a/1", Some(put), None), "CAS delete a/1");
    ok(store.delete("b/1"), "delete outside prefix");
    let created = ok(store.compare_and_swap("a/2", None, Some(b"2")), "CAS create a/2");

    // Anything that should have been filtered out would arrive before these, in revision order.
    assert_eq!(
        next_event(&watch, "put of a/1"),
        put_event("a/1", b"1", put),
        "first event is the first write under a/ after the watch started"
    );
    assert_eq!(next_event(&watch, "delete of a/1"), delete_event("a/1", deleted));
    assert_eq!(next_event(&watch, "put of a/2"), put_event("a/2", b"2", created));
}

fn watch_everything(store: &dyn Store) {
    let watch = ok(store.watch(""), "watch everything");
    let first = ok(store.put("x", b"1"), "put x");
    let second = ok(store.put("y/z", b"2"), "put y/z");
    let third = ok(store.put("x", b"3"), "overwrite x");
    assert!(ok(store.delete("x"), "delete x"), "x existed");
    let fourth = ok(store.revision(), "revision");

    assert_eq!(next_event(&watch, "put x"), put_event("x", b"1", first));
    assert_eq!(next_event(&watch, "put y/z"), put_event("y/z", b"2", second));
    assert_eq!(next_event(&watch, "overwrite x"), put_event("x", b"3", third));
    assert_eq!(next_event(&watch, "delete x"), delete_event("x", fourth));
}

fn watch_many(store: &dyn Store) {
    let first = ok(store.watch("k"), "first watch");
    let dropped = ok(store.watch("k"), "watch to drop");
    let second = ok(store.watch("k"), "second watch");
    drop(dropped);

    let revision = ok(store.put("k", b"v"), "put k");
    let again = ok(store.put("k", b"w"), "put k again");
    for (name, watch) in [("first", &first), ("second", &second)] {
        assert_eq!(
            next_event(watch, name),
            put_event("k", b"v", revision),
            "{name} watch sees the write despite a dropped sibling"
        );
        assert_eq!(next_event(watch, name), put_event("k", b"w", again));
    }
}

fn invalid_keys(store: &dyn Store) {
    for key in ["", "a\0b", "\0"] {
        let is_invalid = |result: Result<(), StoreError>, op: &str| {
            assert!(
                matches!(result, Err(StoreError::InvalidKey(_))),
                "{op}({key:?}) must fail with InvalidKey, got {result:?}"
            );
        };
        is_invalid(store.get(key).map(drop), "get");
        is_invalid(store.put(key, b"v").map(drop), "put");
        is_invalid(store.delete(key).map(drop), "delete");
        is_invalid(store.compare_and_swap(key, None, Some(b"v")).map(drop), "CAS");
        is_invalid(store.compare_and_swap(key, None, None).map(drop), "CAS delete");
    }
    assert_eq!(ok(store.revision(), "revision"), 0, "rejected writes change nothing");
    assert_eq!(ok(store.list(""), "list"), vec![], "rejected writes store nothing");
}
