//! The behaviour every [`Store`] backend must share, as an executable suite.
//!
//! Backends call [`run_all`] from their own tests. The suite only uses the public trait, and it
//! never assumes that watch events arrive before a write returns (an etcd watch is
//! asynchronous): absence of an event is always checked by ordering, never by a short wait.
//! Revisions are checked relative to where a fresh store starts (0 for SQLite, wherever the
//! shared cluster is for etcd), which holds as long as nothing else writes during a case.

use std::fmt::Debug;
use std::time::Duration;

use crate::{Entry, Event, Revision, Store, StoreError, Txn, Watch};

/// How long to wait for an event that must arrive; generous because CI machines are slow.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One named check; it gets a fresh empty store.
type Case = fn(&dyn Store);

/// The shared test suite every backend must pass.
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
        ("range_reports_its_revision", range_reports_its_revision),
        ("watch_from_replays_then_follows", watch_from_replays_then_follows),
        ("watch_from_compacted_history", watch_from_compacted_history),
        ("txn_is_all_or_nothing", txn_is_all_or_nothing),
        ("txn_refuses_bad_requests", txn_refuses_bad_requests),
        ("lease_expiry_deletes_keys", lease_expiry_deletes_keys),
        ("lease_kept_alive_then_revoked", lease_kept_alive_then_revoked),
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
        Some(Ok(event)) => event,
        Some(Err(error)) => panic!("the watch broke while waiting for {waiting_for}: {error}"),
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
    let base = ok(store.revision(), "revision");
    assert_eq!(ok(store.put("a", b"1"), "put a"), base + 1, "a write adds one");
    assert_eq!(ok(store.put("b", b"1"), "put b"), base + 2, "each write adds one");
    assert_eq!(ok(store.put("a", b"2"), "put a again"), base + 3, "each write adds one");
    assert_eq!(ok(store.revision(), "revision"), base + 3);
    assert_eq!(ok(store.get("b"), "get b").map(|e| e.revision), Some(base + 2));
    assert!(ok(store.delete("a"), "delete a"), "a existed");
    assert_eq!(ok(store.revision(), "revision"), base + 4, "a delete is a write");
    assert!(!ok(store.delete("a"), "delete a again"), "a is gone");
    assert_eq!(ok(store.revision(), "revision"), base + 4, "deleting a missing key writes nothing");
    assert_eq!(ok(store.put("c", b"1"), "put c"), base + 5, "revisions never repeat after a delete");
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
    let base = ok(store.revision(), "revision");
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
    assert_eq!(ok(store.revision(), "revision"), base, "rejected writes change nothing");
    assert_eq!(ok(store.list(""), "list"), vec![], "rejected writes store nothing");
}

fn range_reports_its_revision(store: &dyn Store) {
    ok(store.put("r/1", b"1"), "put r/1");
    let last = ok(store.put("r/2", b"2"), "put r/2");
    ok(store.put("s/1", b"x"), "put outside the prefix");
    let listing = ok(store.range("r/"), "range r/");
    assert_eq!(keys(&listing.entries), ["r/1", "r/2"], "range lists the prefix");
    assert_eq!(listing.revision, ok(store.revision(), "revision"), "range reads at the current revision");
    assert!(listing.revision > last, "the revision counts writes outside the prefix too");
}

fn watch_from_replays_then_follows(store: &dyn Store) {
    let first = ok(store.put("w/1", b"1"), "put w/1");
    let second = ok(store.put("w/2", b"2"), "put w/2");
    ok(store.put("v/1", b"x"), "put outside the prefix");
    let deleted = ok(store.compare_and_swap("w/1", Some(first), None), "delete w/1");

    // From the first write on: the history after it, then live changes, in order, once each.
    let watch = ok(store.watch_from("w/", first), "watch from the first write");
    let live = ok(store.put("w/3", b"3"), "put w/3");
    assert_eq!(next_event(&watch, "replayed put of w/2"), put_event("w/2", b"2", second));
    assert_eq!(next_event(&watch, "replayed delete of w/1"), delete_event("w/1", deleted));
    assert_eq!(next_event(&watch, "live put of w/3"), put_event("w/3", b"3", live));

    // A listing and a watch from its revision together miss nothing and repeat nothing.
    let listing = ok(store.range("w/"), "range w/");
    assert_eq!(keys(&listing.entries), ["w/2", "w/3"]);
    let informer = ok(store.watch_from("w/", listing.revision), "watch from the listing");
    let after = ok(store.put("w/4", b"4"), "put w/4");
    assert_eq!(
        next_event(&informer, "put of w/4"),
        put_event("w/4", b"4", after),
        "only changes after the listing"
    );
}

fn watch_from_compacted_history(store: &dyn Store) {
    let first = ok(store.put("c/k", b"1"), "put c/k");
    ok(store.put("c/k", b"2"), "put c/k again");
    let third = ok(store.put("c/k", b"3"), "put c/k a third time");
    ok(store.compact(third), "compact to the third write");

    match store.watch_from("c/", first) {
        Err(StoreError::Compacted { compacted, .. }) => {
            assert!(compacted > first && compacted <= third, "history starts at {compacted}, after {first}")
        }
        other => panic!("a watch from compacted history must fail with Compacted, got {other:?}"),
    }
    // History from the compaction point on is kept.
    let watch = ok(store.watch_from("c/", third - 1), "watch from the compaction point");
    assert_eq!(next_event(&watch, "the third write"), put_event("c/k", b"3", third));
    assert_eq!(
        ok(store.get("c/k"), "get c/k").map(|e| e.value),
        Some(b"3".to_vec()),
        "compaction keeps live keys"
    );

    let future = ok(store.revision(), "revision") + 10;
    assert!(
        matches!(store.compact(future), Err(StoreError::Invalid(_))),
        "compacting a revision not reached yet is refused"
    );
}

fn txn_is_all_or_nothing(store: &dyn Store) {
    let one = ok(store.put("t/1", b"old"), "put t/1");
    ok(store.put("t/gone", b"x"), "put t/gone");
    let watch = ok(store.watch("t/"), "watch t/");

    let stale = Txn::new().expect("t/1", Some(one + 100)).put("t/1", b"new").put("t/2", b"new");
    assert_conflict(store.txn(&stale), "t/1", Some(one + 100), Some(one), "txn with a stale compare");
    let absent = Txn::new().expect("t/1", Some(one)).expect("t/2", Some(1)).put("t/2", b"new");
    assert_conflict(store.txn(&absent), "t/2", Some(1), None, "txn expecting an absent key at a revision");
    assert_eq!(ok(store.get("t/2"), "get t/2"), None, "a failed txn writes nothing");

    let txn = Txn::new()
        .expect("t/1", Some(one))
        .expect("t/2", None)
        .put("t/1", b"new")
        .put("t/2", b"two")
        .delete("t/gone");
    let revision = ok(store.txn(&txn), "txn");
    assert_eq!(ok(store.revision(), "revision"), revision, "a txn is one write");
    for (key, value) in [("t/1", b"new"), ("t/2", b"two")] {
        assert_eq!(
            ok(store.get(key), "get").map(|e| (e.value, e.revision)),
            Some((value.to_vec(), revision))
        );
    }
    assert_eq!(ok(store.get("t/gone"), "get t/gone"), None);
    // Events of one txn share its revision and come in key order.
    assert_eq!(next_event(&watch, "txn put t/1"), put_event("t/1", b"new", revision));
    assert_eq!(next_event(&watch, "txn put t/2"), put_event("t/2", b"two", revision));
    assert_eq!(next_event(&watch, "txn delete t/gone"), delete_event("t/gone", revision));

    let nothing = Txn::new().delete("t/never").delete("t/gone");
    assert_eq!(
        ok(store.txn(&nothing), "txn deleting absent keys"),
        revision,
        "a txn that changes nothing writes nothing"
    );
}

fn txn_refuses_bad_requests(store: &dyn Store) {
    let base = ok(store.revision(), "revision");
    let twice = Txn::new().put("d/k", b"1").delete("d/k");
    assert!(matches!(store.txn(&twice), Err(StoreError::Invalid(_))), "a key written twice is refused");
    let bad_key = Txn::new().expect("", None).put("d/k", b"1");
    assert!(
        matches!(store.txn(&bad_key), Err(StoreError::InvalidKey(_))),
        "an empty compared key is refused"
    );
    assert!(
        matches!(
            store.txn(&Txn::new().put_leased("d/k", b"1", 0x7eadbeef)),
            Err(StoreError::LeaseExpired(0x7eadbeef))
        ),
        "a put with an unknown lease is refused, naming the lease"
    );
    assert!(
        matches!(store.grant_lease(Duration::ZERO), Err(StoreError::Invalid(_))),
        "a zero TTL is refused"
    );
    assert_eq!(ok(store.revision(), "revision"), base, "refused requests write nothing");
}

/// Long enough for etcd's minimum TTL with the fastest election settings tests use.
const LEASE_TTL: Duration = Duration::from_secs(2);

fn lease_expiry_deletes_keys(store: &dyn Store) {
    let lease = ok(store.grant_lease(LEASE_TTL), "grant");
    let put =
        ok(store.txn(&Txn::new().put_leased("l/agent", b"alive", lease).put("l/kept", b"x")), "leased put");
    assert_eq!(ok(store.get("l/agent"), "get").map(|e| e.revision), Some(put));
    let watch = ok(store.watch_from("l/", put), "watch l/");

    // Nobody renews: the key goes when the lease does, as a delete event.
    match next_event(&watch, "the lease's expiry") {
        Event::Delete { key, revision } => {
            assert_eq!(key, "l/agent");
            assert!(revision > put);
        }
        other => panic!("expected the leased key's deletion, got {other:?}"),
    }
    assert_eq!(ok(store.get("l/agent"), "get after expiry"), None);
    assert!(ok(store.get("l/kept"), "get the unleased key").is_some(), "keys without the lease stay");
    assert!(
        matches!(store.keep_alive(lease), Err(StoreError::LeaseExpired(id)) if id == lease),
        "an expired lease cannot be renewed"
    );
}

fn lease_kept_alive_then_revoked(store: &dyn Store) {
    let lease = ok(store.grant_lease(LEASE_TTL), "grant");
    ok(store.txn(&Txn::new().put_leased("k/agent", b"alive", lease)), "leased put");
    let until = std::time::Instant::now() + LEASE_TTL * 2;
    while std::time::Instant::now() < until {
        ok(store.keep_alive(lease), "keep alive");
        std::thread::sleep(LEASE_TTL / 4);
    }
    assert!(ok(store.get("k/agent"), "get").is_some(), "a renewed lease keeps its keys past its TTL");

    let watch = ok(store.watch("k/"), "watch k/");
    ok(store.revoke_lease(lease), "revoke");
    assert!(matches!(next_event(&watch, "the revoke"), Event::Delete { key, .. } if key == "k/agent"));
    assert!(matches!(store.keep_alive(lease), Err(StoreError::LeaseExpired(_))), "a revoked lease is gone");
    assert!(
        matches!(
            store.txn(&Txn::new().put_leased("k/agent", b"again", lease)),
            Err(StoreError::LeaseExpired(_))
        ),
        "a revoked lease takes no keys"
    );
    ok(store.revoke_lease(lease), "revoking twice is not an error");
}
