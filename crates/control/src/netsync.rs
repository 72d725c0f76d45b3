//! Every host's share of the cluster's networks: each network with the underlay addresses of
//! the hosts its VXLAN joins. [`NetworkSync`] hands each reachable host the set as the store has
//! it now, again whenever the set changes, and again to a host that failed to take it or was
//! offline, one pass at a time, so that an older set never lands on a host after a newer one.
//!
//! Two hosts joining a second apart used to push their sets from two threads at once: the first
//! join's set (without the second host) could reach a host after the second's, leaving that
//! host's VXLAN without a peer, and nothing sent it again.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stratus_api::model::{Host, Network, DEFAULT_PROJECT};

use crate::bell::Bell;
use crate::db::{Db, DbError};
use crate::hosts::Hosts;

/// How often hosts are checked for a set they lack (besides each wake).
const PERIOD: Duration = Duration::from_secs(2);

/// Every network, with the underlay addresses of the hosts its VXLAN joins (all hosts that
/// have one, when there is more than one): what each host is to build.
pub fn networks_with_peers(db: &Db) -> Result<Vec<Network>, DbError> {
    let hosts: Vec<Host> = db.list("/hosts/")?;
    let mut peers: Vec<String> = hosts
        .iter()
        .filter(|h| !h.address.is_empty())
        .map(|h| stratus_agent::daemon::listen_ip(&h.address))
        .collect();
    peers.sort();
    peers.dedup();
    if peers.len() < 2 {
        peers.clear();
    }
    let mut networks: Vec<Network> = db.list("/networks/")?;
    for network in &mut networks {
        network.peers = peers.clone();
    }
    Ok(networks)
}

/// Keeps every host's networks as the store says (see the module's text).
pub struct NetworkSync {
    db: Db,
    hosts: Arc<Hosts>,
    /// Held for a whole pass, so that passes (and the set each read) reach hosts in order;
    /// it holds the hosts whose last attempt failed (said once in the event log, until one
    /// succeeds).
    turn: Mutex<HashSet<String>>,
    /// The fingerprint of the set each host took last.
    given: Mutex<HashMap<String, u64>>,
    wake: Bell,
}

impl NetworkSync {
    pub fn new(db: Db, hosts: Arc<Hosts>) -> Arc<NetworkSync> {
        Arc::new(NetworkSync {
            db,
            hosts,
            turn: Mutex::default(),
            given: Mutex::default(),
            wake: Bell::default(),
        })
    }

    /// Runs passes on a thread of their own, every [`PERIOD`] and at each
    /// [`wake`](Self::wake), while this replica leads (one replica pushes: sets stay in order).
    pub fn spawn(self: &Arc<Self>, leadership: Arc<crate::leader::Leadership>) {
        let this = Arc::clone(self);
        let _ = std::thread::Builder::new().name("networks".into()).spawn(move || loop {
            if leadership.is_leader() {
                this.pass();
            } else {
                // A leader elected later gives every host the set again.
                this.given.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
            this.wake.wait(PERIOD);
        });
    }

    /// Asks for a pass now (a host joined or left, a network came or went).
    pub fn wake(&self) {
        self.wake.ring();
    }

    /// Host `name` is to be given the set again, whatever it took before (it joined anew).
    pub fn forget(&self, name: &str) {
        self.given.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Hands the current set to every reachable host that has not taken it; the failures, as
    /// "on host NAME: error" (each also an event, once until the host takes a set again).
    pub fn pass(&self) -> Vec<String> {
        let mut failing = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        let networks = match networks_with_peers(&self.db) {
            Ok(networks) => networks,
            Err(e) => {
                self.db.event(DEFAULT_PROJECT, "", "error", format!("reading networks: {e}"));
                return vec![format!("reading networks: {e}")];
            }
        };
        let fingerprint = fingerprint(&networks);
        let mut failures = Vec::new();
        for (name, agent) in self.hosts.all() {
            let reachable = self.hosts.is_local(&name) || crate::cluster::host_online(&self.db, &name);
            if !reachable {
                // Whatever it held may be gone when it comes back (a reboot).
                self.forget(&name);
                continue;
            }
            if self.given.lock().unwrap_or_else(|p| p.into_inner()).get(&name) == Some(&fingerprint) {
                continue;
            }
            match agent.prepare_networks(&networks) {
                Ok(()) => {
                    self.given.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), fingerprint);
                    if failing.remove(&name) {
                        self.db.event(
                            DEFAULT_PROJECT,
                            "",
                            "info",
                            format!("host {name}: networks set up again"),
                        );
                    }
                }
                Err(e) => {
                    self.forget(&name);
                    let message = format!("host {name}: setting up its networks: {e}");
                    if failing.insert(name.clone()) {
                        self.db.event(
                            DEFAULT_PROJECT,
                            "",
                            "error",
                            format!("{message} (retried every {PERIOD:?})"),
                        );
                    }
                    failures.push(format!("on host {name}: {e}"));
                }
            }
        }
        failures
    }

    /// Takes `network` (deleted from the store) off every host now, in turn with the passes;
    /// the failures, as [`pass`](Self::pass) gives them. Every host is given the set again
    /// at the next pass.
    pub fn remove(&self, network: &Network) -> Vec<String> {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        let remaining = match networks_with_peers(&self.db) {
            Ok(networks) => networks,
            Err(e) => return vec![format!("reading networks: {e}")],
        };
        let mut failures = Vec::new();
        for (name, agent) in self.hosts.all() {
            if let Err(e) = agent.remove_network(network, &remaining) {
                failures.push(format!("on host {name}: {e}"));
            }
        }
        self.given.lock().unwrap_or_else(|p| p.into_inner()).clear();
        failures
    }
}

/// A digest of the set: equal sets, equal digests (within one process).
fn fingerprint(networks: &[Network]) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_vec(networks).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}
