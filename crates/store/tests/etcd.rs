//! The etcd backend against the shared conformance suite, on real `etcd` processes: one
//! member, and three with one of them killed halfway through the suite. Plus what only a
//! cluster shows: a watch on a member that dies says so instead of going quiet.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stratus_store::etcd_server::{ensure_etcd, EtcdCluster};
use stratus_store::{conformance, EtcdConfig, EtcdStore, Store, StoreError};

/// Starts a cluster of `size` members in a scratch directory, or says loudly why not.
fn cluster(test: &str, size: usize) -> Option<EtcdCluster> {
    if let Err(why) = ensure_etcd() {
        eprintln!("SKIPPED: {test}: {why}");
        return None;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("etcd-{test}-{}", std::process::id()));
    Some(EtcdCluster::start(&dir, size).unwrap_or_else(|error| panic!("{test}: {error}")))
}

/// A fresh namespace per case: every case starts with an empty store on the same cluster.
fn fresh(cluster: &EtcdCluster, cases: &AtomicUsize) -> EtcdStore {
    let n = cases.fetch_add(1, Ordering::Relaxed);
    cluster.store(&format!("/conformance-{n}")).unwrap_or_else(|error| panic!("connecting: {error}"))
}

#[test]
fn conformance_one_member() {
    let Some(cluster) = cluster("one-member", 1) else { return };
    let cases = AtomicUsize::new(0);
    conformance::run_all(&mut || fresh(&cluster, &cases));
}

#[test]
fn conformance_three_members_one_killed() {
    let Some(mut cluster) = cluster("three-members", 3) else { return };
    let cases = AtomicUsize::new(0);
    conformance::run_all(&mut || {
        // Halfway through, the member every client tries first dies: the rest of the suite
        // runs against the two that are left, through failover.
        if cases.load(Ordering::Relaxed) == 10 {
            eprintln!("killing member 0");
            cluster.kill(0);
        }
        fresh(&cluster, &cases)
    });
}

#[test]
fn a_watch_on_a_dead_member_reports_it() {
    let Some(mut cluster) = cluster("dead-watch", 3) else { return };
    // Only member 0, so the watch is certainly on the member that dies.
    let only_first = EtcdConfig::parse(&cluster.endpoints()[0]).unwrap().with_namespace("/dead-watch");
    let watcher = EtcdStore::connect(only_first).unwrap();
    let watch = watcher.watch("hosts/").unwrap();
    let writer = cluster.store("/dead-watch").unwrap();
    writer.put("hosts/h1", b"up").unwrap();
    let event = watch.recv_timeout(Duration::from_secs(10)).expect("an event").expect("not an error");
    assert_eq!(event.key(), "hosts/h1");

    cluster.kill(0);
    match watch.recv_timeout(Duration::from_secs(10)) {
        Some(Err(StoreError::Backend(message))) => assert!(message.contains("watch"), "{message}"),
        other => panic!("a watch whose member died must end with an error, got {other:?}"),
    }
    // The two members left still serve a store that knows all three.
    assert_eq!(writer.get("hosts/h1").unwrap().map(|e| e.value), Some(b"up".to_vec()));
    assert!(writer.put("hosts/h2", b"up").is_ok(), "writes go on with two of three members");
}

#[test]
fn an_unreachable_cluster_is_one_clear_error() {
    let config = EtcdConfig {
        request_timeout: Duration::from_millis(500),
        ..EtcdConfig::parse("http://127.0.0.1:9").unwrap()
    };
    match EtcdStore::connect(config) {
        Err(StoreError::Backend(message)) => {
            assert!(message.contains("127.0.0.1:9") && !message.contains('\n'), "{message}")
        }
        Ok(_) => panic!("nothing listens on port 9"),
        Err(other) => panic!("expected a Backend error, got {other}"),
    }
}
