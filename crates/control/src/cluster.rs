//! Hosts joining the cluster and staying in it. `stratus host add NAME` issues a join token
//! (single-use, expiring); the agent trades it for a per-host credential, which both sides
//! present from then on (the agent to the control plane on its heartbeats, the control plane
//! to the agent on every order). Each heartbeat renews a store lease holding the host's
//! `/alive/NAME` key: the host is online while the key exists, and offline once the lease
//! expires ([`LIVENESS_TTL`] after the last heartbeat), on every control plane replica alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stratus_api::model::{now, Desired, Host, Instance};
use stratus_protocol::{HostInfo, HttpAgent};
use stratus_store::{LeaseId, StoreError, Txn};

use crate::db::{host_key, Db, DbError};
use crate::hosts::Hosts;
use crate::remote::RemoteHost;

/// How long a host stays online after its last heartbeat.
pub const LIVENESS_TTL: Duration = Duration::from_secs(10);
/// How long a join token is good for unless asked otherwise.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A join token as stored: the host it is for, its secret and when it expires.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JoinToken {
    host: String,
    secret: String,
    expires_at: u64,
}

/// A host's credential as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Credential {
    secret: String,
}

/// Why a join or heartbeat was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The token is unknown, used, expired or for another host; the credential is wrong.
    #[error("{0}")]
    Refused(String),
    /// The request cannot be carried out as things are (a host with instances, a name taken).
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] DbError),
}

impl From<StoreError> for ClusterError {
    fn from(e: StoreError) -> Self {
        ClusterError::Store(DbError::Store(e))
    }
}

fn token_key(id: &str) -> String {
    format!("/join-tokens/{id}")
}

fn credential_key(host: &str) -> String {
    format!("/host-credentials/{host}")
}

fn alive_key(host: &str) -> String {
    format!("/alive/{host}")
}

/// A join token handed out: give it to the new host's agent.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Invitation {
    /// The host it is for.
    pub host: String,
    /// The token, `ID.SECRET`.
    pub token: String,
    /// Unix seconds after which it is refused.
    pub expires_at: u64,
}

/// Whether host `name`'s liveness key exists in `db` (its lease has not expired).
pub fn host_online(db: &Db, name: &str) -> bool {
    matches!(db.store().get(&alive_key(name)), Ok(Some(_)))
}

/// The membership of the cluster: tokens, credentials, heartbeats.
pub struct Cluster {
    db: Db,
    hosts: Arc<Hosts>,
    /// How long a host stays online after its last heartbeat ([`LIVENESS_TTL`]).
    liveness: Duration,
    /// The liveness lease of each host whose heartbeats this replica has taken.
    leases: Mutex<HashMap<String, LeaseId>>,
    /// The address each host's agent was connected at.
    connected: Mutex<HashMap<String, String>>,
}

impl Cluster {
    /// Membership over `db`, registering joined hosts' agents in `hosts`.
    pub fn new(db: Db, hosts: Arc<Hosts>) -> Cluster {
        Cluster { db, hosts, liveness: LIVENESS_TTL, leases: Mutex::default(), connected: Mutex::default() }
    }

    /// How long a host stays online after its last heartbeat.
    pub fn liveness(&self) -> Duration {
        self.liveness
    }

    /// The same, with hosts offline `ttl` after their last heartbeat (for tests).
    pub fn with_liveness(mut self, ttl: Duration) -> Cluster {
        self.liveness = ttl;
        self
    }

    /// Registers the agent of every host that has joined and is not registered yet, and
    /// forgets hosts removed from the cluster (at start, and as other replicas change it).
    pub fn refresh(&self) -> Result<(), ClusterError> {
        let joined = self.db.list::<Host>("/hosts/")?;
        for host in &joined {
            // Registered already, at the address it has now (or attached in process).
            let current = self.hosts.get(&host.name).is_some()
                && self
                    .connected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&host.name)
                    .is_none_or(|address| *address == host.address);
            if self.hosts.is_local(&host.name) || host.address.is_empty() || current {
                continue;
            }
            if let Some((credential, _)) = self.db.get::<Credential>(&credential_key(&host.name))? {
                self.connect(&host.name, &host.address, &credential.secret);
            }
        }
        for (name, _) in self.hosts.all() {
            if !self.hosts.is_local(&name) && !joined.iter().any(|h| h.name == name) {
                self.hosts.remove(&name);
            }
        }
        Ok(())
    }

    /// Drives host `name` through `agent` from now on (a simulated host, in tests).
    pub fn attach(&self, name: &str, agent: Arc<dyn stratus_protocol::Agent>) {
        self.hosts.insert(name, Arc::new(RemoteHost::new(name, agent)));
    }

    fn connect(&self, name: &str, address: &str, secret: &str) {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), address.to_string());
        let agent = Arc::new(HttpAgent::new(address, secret));
        self.hosts.insert(name, Arc::new(RemoteHost::new(name, agent)));
    }

    /// Issues a join token for host `name`, good for `ttl`.
    pub fn invite(&self, name: &str, ttl: Duration) -> Result<Invitation, ClusterError> {
        if self.hosts.is_local(name) {
            return Err(ClusterError::Conflict(format!("host '{name}' is this control plane's own host")));
        }
        if let Some((host, _)) = self.db.get::<Host>(&host_key(name))? {
            if host.seen_at != 0 {
                return Err(ClusterError::Conflict(format!(
                    "host '{name}' has joined already (remove it first with `stratus host remove {name}`)"
                )));
            }
        }
        let id = stratus_api::model::new_id();
        let secret = format!("{}{}", stratus_api::model::new_id(), stratus_api::model::new_id());
        let expires_at = now() + ttl.as_secs().max(1);
        self.db.put(
            &token_key(&id),
            &JoinToken { host: name.to_string(), secret: secret.clone(), expires_at },
        )?;
        let joining = Host {
            name: name.to_string(),
            cpus: 0,
            memory_mib: 0,
            allocatable_mib: 0,
            allocated_mib: 0,
            allocated_cpus: 0,
            instances: 0,
            hypervisor: String::new(),
            seen_at: 0,
            address: String::new(),
            state: String::new(),
            maintenance: false,
            cpu_percent: None,
            shared_pool: false,
        };
        self.db.put(&host_key(name), &joining)?;
        Ok(Invitation { host: name.to_string(), token: format!("{id}.{secret}"), expires_at })
    }

    /// Trades a join token for host `info.name`'s credential: checks the token (known, for
    /// this host, not expired, not used: it is used up here), records the host and its
    /// address, and connects to its agent.
    pub fn join(&self, token: &str, info: &HostInfo) -> Result<String, ClusterError> {
        let refused = |why: &str| ClusterError::Refused(format!("join refused: {why}"));
        let (id, secret) = token.split_once('.').ok_or_else(|| refused("that is not a join token"))?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refused("that is not a join token"));
        }
        let Some((stored, revision)) = self.db.get::<JoinToken>(&token_key(id))? else {
            return Err(refused("unknown or already used token"));
        };
        if !stratus_protocol::constant_time_eq(stored.secret.as_bytes(), secret.as_bytes()) {
            return Err(refused("unknown or already used token"));
        }
        if stored.host != info.name {
            return Err(refused(&format!("the token is for host '{}', not '{}'", stored.host, info.name)));
        }
        if stored.expires_at <= now() {
            let _ = self.db.delete(&token_key(id));
            return Err(refused("the token has expired; issue a new one with `stratus host add`"));
        }
        check_address(&info.address).map_err(|_| refused("the agent's address is not IP:PORT"))?;
        let credential = format!(
            "{}{}{}{}",
            stratus_api::model::new_id(),
            stratus_api::model::new_id(),
            stratus_api::model::new_id(),
            stratus_api::model::new_id()
        );
        let mut host = stratus_agent::wire::host_record(info);
        host.seen_at = now();
        let host_bytes = serde_json::to_vec(&host).map_err(|e| ClusterError::Conflict(e.to_string()))?;
        let credential_bytes = serde_json::to_vec(&Credential { secret: credential.clone() })
            .map_err(|e| ClusterError::Conflict(e.to_string()))?;
        // One write: the token is used up exactly when the credential exists.
        let txn = Txn::new()
            .expect(&token_key(id), Some(revision))
            .delete(&token_key(id))
            .put(&credential_key(&info.name), &credential_bytes)
            .put(&host_key(&info.name), &host_bytes);
        match self.db.store().txn(&txn) {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => return Err(refused("unknown or already used token")),
            Err(e) => return Err(e.into()),
        }
        self.connect(&info.name, &info.address, &credential);
        self.mark_alive(&info.name)?;
        Ok(credential)
    }

    /// Whether `secret` is host `name`'s credential.
    pub fn authenticate(&self, name: &str, secret: &str) -> Result<(), ClusterError> {
        match self.db.get::<Credential>(&credential_key(name))? {
            Some((credential, _))
                if stratus_protocol::constant_time_eq(credential.secret.as_bytes(), secret.as_bytes()) =>
            {
                Ok(())
            }
            _ => Err(ClusterError::Refused(format!("wrong credential for host '{name}'"))),
        }
    }

    /// Takes a heartbeat of host `info.name` (already authenticated): its capacity and
    /// address are recorded and its liveness lease renewed.
    pub fn heartbeat(&self, info: &HostInfo) -> Result<(), ClusterError> {
        let name = info.name.clone();
        check_address(&info.address)?;
        let before = self.db.get::<Host>(&host_key(&name))?.map(|(host, _)| host.address);
        let updated = self.db.update(&host_key(&name), |host: &mut Host| {
            let maintenance = host.maintenance;
            *host = stratus_agent::wire::host_record(info);
            host.maintenance = maintenance;
            true
        });
        match updated {
            Ok(_) => {}
            Err(DbError::NotFound(_)) => {
                return Err(ClusterError::Refused(format!("host '{name}' is not part of the cluster")))
            }
            Err(e) => return Err(e.into()),
        }
        // Reached at a new address (or not registered on this replica yet): connect again.
        if self.hosts.get(&name).is_none() || before.as_deref() != Some(info.address.as_str()) {
            if let Some((credential, _)) = self.db.get::<Credential>(&credential_key(&name))? {
                self.connect(&name, &info.address, &credential.secret);
            }
        }
        self.mark_alive(&name)
    }

    /// Renews (or creates) host `name`'s liveness lease and key.
    fn mark_alive(&self, name: &str) -> Result<(), ClusterError> {
        let store = self.db.store();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = leases.get(name) {
            match store.keep_alive(*lease) {
                // The key is put again with the lease: another replica's lease may hold it.
                Ok(()) => {
                    store.txn(&Txn::new().put_leased(
                        &alive_key(name),
                        now().to_string().as_bytes(),
                        *lease,
                    ))?;
                    return Ok(());
                }
                Err(StoreError::LeaseExpired(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let lease = store.grant_lease(self.liveness)?;
        store.txn(&Txn::new().put_leased(&alive_key(name), now().to_string().as_bytes(), lease))?;
        leases.insert(name.to_string(), lease);
        Ok(())
    }

    /// Whether host `name`'s liveness key exists (its lease has not expired).
    pub fn is_online(&self, name: &str) -> bool {
        host_online(&self.db, name)
    }

    /// Removes host `name` from the cluster: refused while instances are placed there.
    pub fn remove(&self, name: &str) -> Result<(), ClusterError> {
        if self.hosts.is_local(name) {
            return Err(ClusterError::Conflict(format!("host '{name}' is this control plane's own host")));
        }
        if self.db.get::<Host>(&host_key(name))?.is_none() {
            return Err(ClusterError::Store(DbError::NotFound(format!("host '{name}'"))));
        }
        let placed: Vec<String> = self
            .db
            .instances()?
            .into_iter()
            .filter(|i: &Instance| {
                i.status.host == name && !(i.desired == Desired::Deleted && i.status.pid == 0)
            })
            .map(|i| i.name)
            .collect();
        if !placed.is_empty() {
            return Err(ClusterError::Conflict(format!(
                "host '{name}' still has instances: {} (delete or move them first)",
                placed.join(", ")
            )));
        }
        let store = self.db.store();
        if let Some(lease) = self.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(name) {
            let _ = store.revoke_lease(lease);
        }
        let _ = store.delete(&alive_key(name));
        let _ = store.delete(&credential_key(name));
        // Tokens still out for it are void.
        for entry in store.list("/join-tokens/")? {
            if serde_json::from_slice::<JoinToken>(&entry.value).is_ok_and(|t| t.host == name) {
                let _ = store.delete(&entry.key);
            }
        }
        self.db.delete(&host_key(name))?;
        self.hosts.remove(name);
        Ok(())
    }
}

/// Refuses an agent address that is not `IP:PORT` (it goes into every host's VXLAN peers).
fn check_address(address: &str) -> Result<(), ClusterError> {
    match address.parse::<std::net::SocketAddr>() {
        Ok(_) => Ok(()),
        Err(_) => Err(ClusterError::Refused(format!("'{}' is not IP:PORT", address.escape_default()))),
    }
}
