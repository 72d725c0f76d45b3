//! What the control plane's requests and policies share: [`AppState`] (the store, the hosts
//! and their agents, the reconciler, the leadership), the refusal a request or a move gets
//! ([`ApiError`]: a status and one line), and the views of the cluster every placement reads
//! (hosts with their allocation, an anti-affinity group's members, where an instance is).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::http::StatusCode;
use stratus_agent::HostAgent;
use stratus_api::model::{Desired, Host, Instance, Pool, DEFAULT_PROJECT};

use crate::db::{Db, DbError};
use crate::hosts::Hosts;
use crate::reconciler::Reconciler;
use crate::scheduler::Candidate;

/// Everything a request handler needs.
pub struct AppState {
    /// The data directory (images, instances).
    pub data_dir: std::path::PathBuf,
    /// Builds images by recipe, when this server can.
    pub builder: Option<crate::image::ImageBuilder>,
    /// The store.
    pub db: Db,
    /// The hosts and their agents.
    pub hosts: Arc<Hosts>,
    /// Credentials agents present and joins (hosts in the cluster).
    pub cluster: crate::cluster::Cluster,
    /// The reconciler, woken after each change.
    pub reconciler: Arc<Reconciler>,
    /// Hands hosts the networks (woken when a host or network comes or goes).
    pub networks: Arc<crate::netsync::NetworkSync>,
    /// This replica's part in the control plane's election (the sole replica by default).
    pub leadership: Arc<crate::leader::Leadership>,
    /// The bearer token.
    pub token: String,
    /// Request counters for /metrics.
    pub stats: ApiStats,
    /// Slots for execs running at once ([`MAX_EXECS`]).
    pub execs: Arc<tokio::sync::Semaphore>,
    /// Operation waits that hold a store watch (and a blocking thread) at once; more poll.
    pub waits: Arc<tokio::sync::Semaphore>,
    /// Held while a request checks the host's free memory and claims some of it, so that two
    /// launches (or starts) at once cannot both take the last of it.
    pub admission: std::sync::Mutex<()>,
    /// Each host's CPU use over the rebalancer's window, in percent, as it last measured.
    pub cpu_use: std::sync::Mutex<std::collections::HashMap<String, f64>>,
}

impl AppState {
    /// The API's state over `db`, driving `hosts` (with `cluster` for membership) through
    /// `reconciler`, answering callers with `token`; no image builder.
    pub fn new(
        data_dir: std::path::PathBuf,
        db: Db,
        hosts: Arc<Hosts>,
        cluster: crate::cluster::Cluster,
        reconciler: Arc<Reconciler>,
        token: String,
    ) -> AppState {
        AppState {
            data_dir,
            builder: None,
            networks: crate::netsync::NetworkSync::new(db.clone(), Arc::clone(&hosts)),
            leadership: crate::leader::Leadership::sole(""),
            db,
            hosts,
            cluster,
            reconciler,
            token,
            stats: ApiStats::default(),
            execs: Arc::new(tokio::sync::Semaphore::new(MAX_EXECS)),
            waits: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHED_WAITS)),
            admission: std::sync::Mutex::default(),
            cpu_use: std::sync::Mutex::default(),
        }
    }
}

/// Operation waits answered through a store watch at once (see [`AppState::waits`]).
pub const MAX_WATCHED_WAITS: usize = 128;

/// API request counters.
#[derive(Default)]
pub struct ApiStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Of which 4xx.
    pub client_errors: AtomicU64,
    /// Of which 5xx.
    pub server_errors: AtomicU64,
    /// Sum of request durations, microseconds.
    pub latency_us: AtomicU64,
}

/// Execs running at once through the API; more are refused (503) rather than queued, as each
/// holds a thread of the blocking pool while it runs.
pub const MAX_EXECS: usize = 64;

/// An API error: an HTTP status and one line for the user.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// A refusal with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    /// What the refusal says.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 404: what it names does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// 409: not now, in this state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    /// 422: well formed, but not something that can be done.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Exists(_) => ApiError::conflict(e.to_string()),
            DbError::NotFound(_) => ApiError::not_found(e.to_string()),
            // A name from a request that can be no key (NUL): the request's fault.
            DbError::Store(stratus_store::StoreError::InvalidKey(_)) => ApiError::bad_request(e.to_string()),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// A request's (or a move's) outcome.
pub type ApiResult<T> = Result<T, ApiError>;

pub fn find_instance(state: &AppState, name: &str) -> ApiResult<Instance> {
    state
        .db
        .instance(DEFAULT_PROJECT, name)?
        .ok_or_else(|| ApiError::not_found(format!("instance '{name}' not found")))
}

/// Memory and vCPUs given to instances that are meant to exist.
pub fn allocation<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> (u64, u32, u32) {
    instances
        .into_iter()
        .filter(|i| i.desired == Desired::Running)
        .fold((0, 0, 0), |(m, c, n), i| (m + i.spec.memory_mib, c + i.spec.cpus, n + 1))
}

/// The name of the host `instance` is placed on ("" in records from before hosts were named:
/// this machine's own host).
pub fn placed_on<'a>(state: &'a AppState, instance: &'a Instance) -> &'a str {
    state.hosts.resolve(&instance.status.host)
}

/// The agent of the host `instance` is placed on.
pub fn agent_of(state: &AppState, instance: &Instance) -> ApiResult<Arc<dyn HostAgent>> {
    state.hosts.get(&instance.status.host).ok_or_else(|| {
        ApiError::conflict(format!(
            "instance '{}' is on host '{}', which is not part of the cluster",
            instance.name, instance.status.host
        ))
    })
}

/// Every host as the API shows it and the scheduler weighs it: its record, whether it is
/// online, and the memory and vCPUs of the instances meant to run there.
pub fn host_views(state: &AppState) -> ApiResult<Vec<Host>> {
    hosts_of(state, &state.db.instances()?)
}

/// [`host_views`], for a caller that has read `instances` already.
pub fn hosts_of(state: &AppState, instances: &[Instance]) -> ApiResult<Vec<Host>> {
    let mut hosts: Vec<Host> = state.db.list("/hosts/")?;
    if let (Some(name), Some(agent)) = (state.hosts.local_name(), state.hosts.local()) {
        // This machine's host is asked directly: its capacity is always current.
        let fresh = agent.host();
        match hosts.iter_mut().find(|h| h.name == name) {
            Some(host) => *host = Host { maintenance: host.maintenance, ..fresh },
            None => hosts.push(fresh),
        }
    }
    for host in &mut hosts {
        let (memory, cpus, count) = allocation(instances.iter().filter(|i| placed_on(state, i) == host.name));
        host.allocated_mib = memory;
        host.allocated_cpus = cpus;
        host.instances = count;
        host.cpu_percent = state.cpu_use.lock().unwrap_or_else(|p| p.into_inner()).get(&host.name).copied();
        host.state = if state.hosts.is_local(&host.name) || state.cluster.is_online(&host.name) {
            "online".into()
        } else if host.seen_at == 0 {
            "joining".into()
        } else {
            "offline".into()
        };
    }
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts)
}

/// Refuses (409, with the reason) `memory_mib` more for instances than `host` has free.
pub fn check_free_memory(host: &Host, memory_mib: u64) -> ApiResult<()> {
    if host.allocated_mib + memory_mib > host.allocatable_mib {
        return Err(ApiError::conflict(format!(
            "not enough memory: host {} has {} MiB free for instances, {} MiB asked",
            host.name,
            host.allocatable_mib.saturating_sub(host.allocated_mib),
            memory_mib
        )));
    }
    Ok(())
}

/// The (host, name) of every instance among `instances` of anti-affinity `group` but
/// `except` ("" groups none).
pub fn group_members(
    state: &AppState,
    instances: &[Instance],
    group: &str,
    except: &str,
) -> Vec<(String, String)> {
    if group.is_empty() {
        return Vec::new();
    }
    instances
        .iter()
        .filter(|i| i.spec.anti_affinity == group && i.name != except && i.desired != Desired::Deleted)
        .map(|i| (placed_on(state, i).to_owned(), i.name.clone()))
        .collect()
}

/// A host as the scheduler weighs it for an instance with its disk on `pool`, with the
/// `members` of the group being placed.
pub fn candidate(host: &Host, members: &[(String, String)], pool: Pool) -> Candidate {
    Candidate {
        lacks: (pool == Pool::Shared && !host.shared_pool).then_some("no shared storage pool"),
        name: host.name.clone(),
        online: host.state == "online",
        maintenance: host.maintenance,
        allocatable_mib: host.allocatable_mib,
        allocated_mib: host.allocated_mib,
        group_members: members
            .iter()
            .filter(|(on, _)| *on == host.name)
            .map(|(_, name)| name.clone())
            .collect(),
    }
}

impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        use crate::cluster::ClusterError;
        match e {
            ClusterError::Refused(why) => ApiError::new(StatusCode::FORBIDDEN, why),
            ClusterError::Conflict(why) => ApiError::conflict(why),
            ClusterError::Store(e) => e.into(),
        }
    }
}
