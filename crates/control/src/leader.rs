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

/// The key the leader holds, its value the leader's name and API URL.
pub const LEADER_KEY: &str = "/control/leader";

/// How long a dead leader's key outlives it: the time a takeover can take.
pub const LEADER_TTL: Duration = Duration::from_secs(5);

/// This replica's part in the election.
pub struct Leadership {
    name: String,
    /// Where other replicas reach this one's API (held in the key with the name).
    url: String,
    /// The store elected through (`None`: the sole replica, always leader).
    store: Option<Arc<dyn Store>>,
    ttl: Duration,
    leading: AtomicBool,
    /// When the last renewal that succeeded was sent: past it plus the lease's life less a
    /// margin, this replica no longer counts itself leader, even before the store answers.
    renewed: Mutex<Instant>,
    /// The lease held while leading.
    lease: Mutex<Option<LeaseId>>,
    /// Set by [`resign`](Self::resign): the replica stops and campaigns no more.
    stopped: AtomicBool,
}

impl Leadership {
    /// The only replica there is (`stratus serve`): leads from the start.
    pub fn sole(name: &str) -> Arc<Leadership> {
        Arc::new(Leadership {
            name: name.to_string(),
            url: String::new(),
            store: None,
            ttl: LEADER_TTL,
            leading: AtomicBool::new(true),
            renewed: Mutex::new(Instant::now()),
            lease: Mutex::new(None),
            stopped: AtomicBool::new(false),
        })
    }

    /// Replica `name`, whose API answers at `url`, electing through `store` with leases of
    /// `ttl`; follows until [`spawn`](Self::spawn)'s loop wins it the lead.
    pub fn elect(name: &str, url: &str, store: Arc<dyn Store>, ttl: Duration) -> Arc<Leadership> {
        Arc::new(Leadership {
            name: name.to_string(),
            url: url.to_string(),
            store: Some(store),
            ttl,
            leading: AtomicBool::new(false),
            renewed: Mutex::new(Instant::now()),
            lease: Mutex::new(None),
            stopped: AtomicBool::new(false),
        })
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this replica leads now: it won the key, and its last renewal was sent recently
    /// enough that the lease cannot have run out yet (a renewal stuck on an unreachable store
    /// does not keep it leading).
    pub fn is_leader(&self) -> bool {
        if !self.leading.load(Ordering::SeqCst) {
            return false;
        }
        self.store.is_none()
            || self.renewed.lock().unwrap_or_else(|p| p.into_inner()).elapsed() < self.safe_for()
    }

    /// How long after a renewal is sent the lease surely still holds.
    fn safe_for(&self) -> Duration {
        self.ttl - self.ttl / 5
    }

    /// The leading replica's name and API URL, as the store has them (`None` while none leads).
    pub fn leader(&self) -> Option<(String, String)> {
        match &self.store {
            None => Some((self.name.clone(), self.url.clone())),
            Some(store) => match store.get(LEADER_KEY) {
                Ok(Some(entry)) => {
                    let value = String::from_utf8_lossy(&entry.value).into_owned();
                    let (name, url) = value.split_once(' ').unwrap_or((value.as_str(), ""));
                    Some((name.to_string(), url.to_string()))
                }
                _ => None,
            },
        }
    }

    /// Runs the election on a thread of its own: tries for the lead while following, renews
    /// it while leading, and calls `elected` each time this replica becomes leader.
    pub fn spawn(self: &Arc<Self>, elected: impl Fn() + Send + Sync + 'static) {
        let Some(store) = self.store.clone() else {
            elected();
            return;
        };
        let this = Arc::clone(self);
        let elected = Arc::new(elected);
        let _ = std::thread::Builder::new().name("election".into()).spawn(move || {
            let step = this.ttl / 5;
            while !this.stopped.load(Ordering::SeqCst) {
                let sent = Instant::now();
                if this.leading.load(Ordering::SeqCst) {
                    match this.renew(store.as_ref()) {
                        Ok(()) => *this.renewed.lock().unwrap_or_else(|p| p.into_inner()) = sent,
                        // Lost for sure (the lease is gone), or maybe (the store is away, and
                        // is_leader() already says no): either way, step down.
                        Err(e) if matches!(e, StoreError::LeaseExpired(_)) || !this.is_leader() => {
                            this.leading.store(false, Ordering::SeqCst);
                            if let Some(lease) = this.lease.lock().unwrap_or_else(|p| p.into_inner()).take() {
                                let _ = store.revoke_lease(lease);
                            }
                            eprintln!("stratus control: {} no longer leads: {e}", this.name);
                        }
                        Err(_) => {}
                    }
                } else if this.campaign(store.as_ref()) {
                    *this.renewed.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                    this.leading.store(true, Ordering::SeqCst);
                    eprintln!("stratus control: {} leads (the reconcilers run here)", this.name);
                    // On a thread of its own: the lease is renewed meanwhile.
                    let elected = Arc::clone(&elected);
                    let _ = std::thread::Builder::new().name("elected".into()).spawn(move || elected());
                }
                std::thread::sleep(step.saturating_sub(sent.elapsed()));
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
        let value = format!("{} {}", self.name, self.url);
        let claim = Txn::new().expect(LEADER_KEY, None).put_leased(LEADER_KEY, value.as_bytes(), lease);
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
        self.stopped.store(true, Ordering::SeqCst);
        let Some(store) = &self.store else { return };
        if self.leading.swap(false, Ordering::SeqCst) {
            if let Some(lease) = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = store.revoke_lease(lease);
            }
        }
    }
}
