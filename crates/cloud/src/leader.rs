//! One leader among the control plane's replicas. Every replica serves the API; only the leader
//! acts on hosts (the reconciler, the network sync, settling interrupted moves), so two replicas
//! never drive one instance at once.
//!
//! The election is a key held by a lease, as etcd's own election and Kubernetes' leader leases
//! do: a replica becomes leader by creating [`LEADER_KEY`] (a transaction that fails if the key
//! exists) with a lease of [`LEADER_TTL`], and stays leader by keeping the lease alive. A leader
//! that dies stops renewing; the store drops the key with the lease, and the next replica to
//! try takes it. A leader that cannot renew (it lost the store) steps down once the lease may
//! have run out, before another can have taken over. `stratus serve` (one process, SQLite) is
//! the sole replica and always leads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stratus_store::{LeaseId, Store, StoreError, Txn};

/// The key the leader holds, its value the leader's name.
pub const LEADER_KEY: &str = "/control/leader";

/// How long a dead leader's key outlives it: the time a takeover can take.
pub const LEADER_TTL: Duration = Duration::from_secs(5);

/// This replica's part in the election.
pub struct Leadership {
    name: String,
    /// The store elected through (`None`: the sole replica, always leader).
    store: Option<Arc<dyn Store>>,
    ttl: Duration,
    leading: AtomicBool,
    /// The lease held while leading.
    lease: Mutex<Option<LeaseId>>,
}

impl Leadership {
    /// The only replica there is (`stratus serve`): leads from the start.
    pub fn sole(name: &str) -> Arc<Leadership> {
        Arc::new(Leadership {
            name: name.to_string(),
            store: None,
            ttl: LEADER_TTL,
            leading: AtomicBool::new(true),
            lease: Mutex::new(None),
        })
    }

    /// Replica `name`, electing through `store` with leases of `ttl`; follows until
    /// [`spawn`](Self::spawn)'s loop wins it the lead.
    pub fn elect(name: &str, store: Arc<dyn Store>, ttl: Duration) -> Arc<Leadership> {
        Arc::new(Leadership {
            name: name.to_string(),
            store: Some(store),
            ttl,
            leading: AtomicBool::new(false),
            lease: Mutex::new(None),
        })
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The leading replica's name, as the store has it (`None` while there is none).
    pub fn leader(&self) -> Option<String> {
        match &self.store {
            None => Some(self.name.clone()),
            Some(store) => match store.get(LEADER_KEY) {
                Ok(Some(entry)) => Some(String::from_utf8_lossy(&entry.value).into_owned()),
                _ => None,
            },
        }
    }

    /// Runs the election on a thread of its own: tries for the lead while following, renews
    /// it while leading, and calls `elected` each time this replica becomes leader.
    pub fn spawn(self: &Arc<Self>, elected: impl Fn() + Send + 'static) {
        let Some(store) = self.store.clone() else {
            elected();
            return;
        };
        let this = Arc::clone(self);
        let _ = std::thread::Builder::new().name("election".into()).spawn(move || {
            let step = this.ttl / 5;
            let mut renewed = Instant::now();
            loop {
                if this.is_leader() {
                    match this.renew(store.as_ref()) {
                        Ok(()) => renewed = Instant::now(),
                        Err(e) => {
                            // Lost for sure (the lease is gone), or maybe (the store is away):
                            // either way, step down before another may have taken over.
                            let gone = matches!(e, StoreError::LeaseExpired(_));
                            if gone || renewed.elapsed() + step >= this.ttl {
                                this.leading.store(false, Ordering::SeqCst);
                                eprintln!("stratus control: {} no longer leads: {e}", this.name);
                            }
                        }
                    }
                } else if this.campaign(store.as_ref()) {
                    renewed = Instant::now();
                    this.leading.store(true, Ordering::SeqCst);
                    eprintln!("stratus control: {} leads (the reconcilers run here)", this.name);
                    elected();
                }
                std::thread::sleep(step);
            }
        });
    }

    fn renew(&self, store: &dyn Store) -> Result<(), StoreError> {
        let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        match lease {
            Some(lease) => store.keep_alive(lease),
            None => Err(StoreError::LeaseExpired(0)),
        }
    }

    /// One try for the lead: whether it was won.
    fn campaign(&self, store: &dyn Store) -> bool {
        if !matches!(store.get(LEADER_KEY), Ok(None)) {
            return false;
        }
        let Ok(lease) = store.grant_lease(self.ttl) else { return false };
        let claim = Txn::new().expect(LEADER_KEY, None).put_leased(LEADER_KEY, self.name.as_bytes(), lease);
        match store.txn(&claim) {
            Ok(_) => {
                *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
                true
            }
            Err(_) => {
                let _ = store.revoke_lease(lease);
                false
            }
        }
    }

    /// Gives up the lead at once (the replica is stopping): another takes over without
    /// waiting for the lease to run out.
    pub fn resign(&self) {
        let Some(store) = &self.store else { return };
        if self.leading.swap(false, Ordering::SeqCst) {
            if let Some(lease) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = store.revoke_lease(lease);
            }
        }
    }
}
