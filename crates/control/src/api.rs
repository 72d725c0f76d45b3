//! The REST API, versioned under `/v1/`: JSON in and out, a bearer token on every call, errors
//! as `{"error": "..."}` with a 4xx status that changes nothing. Creation is asynchronous: the
//! API records the desired state, wakes the reconciler and answers `202` with an operation
//! that `GET /v1/operations/{id}/wait` waits on. `/openapi.json` describes every route.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use stratus_agent::network::{self, Subnet};
use stratus_agent::HostAgent;
use stratus_api::model::{
    check_name, new_id, now, ClusterConfig, ConsolidationPlan, Desired, Host, Image, Instance, InstanceSpec,
    InstanceState, InstanceStatus, Network, Operation, OperationState, RestartPolicy, DEFAULT_PROJECT,
};

use crate::db::{image_key, instance_key, network_key, operation_key, Db, DbError};
use crate::hosts::Hosts;
use crate::ipam;
use crate::reconciler::Reconciler;
use crate::scheduler::{self, Candidate, Policy};

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
        }
    }
}

/// The largest JSON request body (axum's own limit for `Json`).
const MAX_JSON_BODY: usize = 2 << 20;

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

type Shared = Arc<AppState>;

/// An API error: an HTTP status and one line for the user.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    /// What the refusal says.
    pub fn message(&self) -> &str {
        &self.message
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    fn unprocessable(message: impl Into<String>) -> Self {
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

/// A JSON error response, for handlers that answer with something other than JSON.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose every decoding failure is a 400 with a JSON error.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "send the body as Content-Type: application/json",
                ),
                other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body: {}", other.body_text()),
                ),
                other => ApiError::bad_request(format!("bad request body: {}", other.body_text())),
            }),
        }
    }
}

/// Query parameters whose every decoding failure is a 400 with a JSON error.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Params(value)),
            Err(rejection) => Err(ApiError::bad_request(format!("bad query: {}", rejection.body_text()))),
        }
    }
}

/// A resource name or id from the path. One that no resource can have (not 1-63 of `a-z`,
/// `0-9`, `-`) is a 404 at once: it never reaches the store as part of a key.
pub struct Name(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(format!("bad path: {}", rejection.body_text())))?;
        if !is_resource_name(&name) {
            return Err(ApiError::not_found(format!("'{}' not found", name.escape_default())));
        }
        Ok(Name(name))
    }
}

/// Whether `name` is one a resource can have: 1-63 of `a-z`, `0-9`, `-`.
fn is_resource_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The router with every route.
pub fn router(state: Shared) -> Router {
    // Routes only the leader takes (a follower passes them on): see `leader_only`.
    let lead = || axum::middleware::from_fn_with_state(Arc::clone(&state), leader_only);
    let v1 = Router::new()
        .route("/instances", get(list_instances).merge(post(launch).route_layer(lead())))
        .route("/instances/{name}", get(get_instance).delete(delete_instance))
        .route("/instances/{name}/start", post(start_instance).route_layer(lead()))
        .route("/instances/{name}/stop", post(stop_instance))
        .route("/instances/{name}/restart", post(restart_instance).route_layer(lead()))
        .route("/instances/{name}/exec", post(exec))
        .route("/instances/{name}/move", post(move_instance).route_layer(lead()))
        .route("/instances/{name}/metrics", get(instance_metrics))
        .route("/instances/{name}/console", get(crate::console::console))
        .route("/images", get(list_images).post(import_image))
        .route("/images/build", post(build_image))
        .route("/images/{name}", get(get_image).delete(delete_image))
        .route("/uploads/{name}", axum::routing::put(upload).delete(delete_upload))
        .route("/networks", get(list_networks).post(create_network))
        .route("/networks/{name}", get(get_network).delete(delete_network))
        .route("/hosts", get(list_hosts).post(add_host))
        .route("/hosts/{name}", get(get_host).delete(remove_host))
        .route("/hosts/{name}/evacuate", post(evacuate_host).route_layer(lead()))
        .route("/hosts/{name}/restore", post(restore_host).route_layer(lead()))
        .route("/consolidation", get(consolidation_plan).merge(post(consolidate_hosts).route_layer(lead())))
        .route("/config", get(get_config).patch(set_config))
        .route("/control", get(get_control))
        .route("/operations/{id}", get(get_operation))
        .route("/operations/{id}/wait", get(wait_operation))
        .route("/events", get(list_events))
        .fallback(|| async { ApiError::not_found("no such API route") })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authenticate));
    Router::new()
        .nest("/v1", v1)
        .route("/agent/v1/join", post(agent_join))
        .route("/agent/v1/heartbeat", post(agent_heartbeat))
        .route("/agent/v1/images/{dir}/{file}", get(agent_image_file))
        .route("/openapi.json", get(|| async { Json(crate::openapi::document()) }))
        .route("/metrics", get(crate::metrics::prometheus))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), count))
        .with_state(state)
}

/// Counts requests for /metrics, and gives every error answer a JSON body (the router's own
/// 404s and 405s come without one).
async fn count(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let t = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    // A JSON body is read whole before routing: a request refused before its handler reads the
    // body (a bad name in the path) otherwise leaves it unread, and the connection is closed
    // under a client that may be sending its next request on it. Uploads stream.
    let request = if request.method() != axum::http::Method::GET && !path.starts_with("/v1/uploads/") {
        let (parts, body) = request.into_parts();
        match axum::body::to_bytes(body, MAX_JSON_BODY).await {
            Ok(bytes) => Request::from_parts(parts, axum::body::Body::from(bytes)),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body: {e} (at most {MAX_JSON_BODY} bytes)"),
                )
            }
        }
    } else {
        request
    };
    let mut response = next.run(request).await;
    let status = response.status();
    if (status.is_client_error() || status.is_server_error())
        && !response.headers().contains_key(axum::http::header::CONTENT_TYPE)
    {
        let message = match status {
            StatusCode::METHOD_NOT_ALLOWED => format!("{method} is not allowed on {path}"),
            StatusCode::NOT_FOUND => format!("no such resource: {path}"),
            _ => format!("{method} {path}: {}", status.canonical_reason().unwrap_or("error")),
        };
        let allow = response.headers().get(axum::http::header::ALLOW).cloned();
        response = error(status, message);
        if let Some(allow) = allow {
            response.headers_mut().insert(axum::http::header::ALLOW, allow);
        }
    }
    let stats = &state.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.latency_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    if response.status().is_client_error() {
        stats.client_errors.fetch_add(1, Ordering::Relaxed);
    } else if response.status().is_server_error() {
        stats.server_errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

/// Checks the bearer token (or `?token=` for browsers' WebSockets, which cannot set headers).
async fn authenticate(
    State(state): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let from_header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let from_query = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
        .map(str::to_owned);
    match from_header.or(from_query) {
        None => ApiError::new(StatusCode::UNAUTHORIZED, "missing token: send Authorization: Bearer TOKEN")
            .into_response(),
        Some(token) if !stratus_protocol::constant_time_eq(token.as_bytes(), state.token.as_bytes()) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "wrong token").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

// ---- instances ------------------------------------------------------------------------

/// `POST /v1/instances`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchRequest {
    name: String,
    #[serde(default = "default_image")]
    image: String,
    #[serde(default = "one")]
    cpus: u32,
    #[serde(default = "default_memory")]
    memory_mib: u64,
    #[serde(default = "default_disk")]
    disk_mib: u64,
    #[serde(default = "default_network")]
    network: String,
    #[serde(default)]
    restart: RestartPolicy,
    /// The host to run on; the scheduler picks one when absent.
    #[serde(default)]
    host: Option<String>,
    /// How the scheduler ranks hosts: spread (default) or pack.
    #[serde(default)]
    placement: Policy,
    /// No two instances of this group run on one host.
    #[serde(default)]
    anti_affinity: Option<String>,
}

fn default_image() -> String {
    "default".into()
}
fn default_network() -> String {
    "default".into()
}
fn one() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_disk() -> u64 {
    1024
}

/// Largest instance sizes accepted at all (the host's capacity is checked separately).
const MAX_CPUS: u32 = 64;
const MIN_MEMORY_MIB: u64 = 32;
const MAX_DISK_MIB: u64 = 16 << 20;

#[derive(Serialize)]
struct Accepted {
    operation: Operation,
    instance: Instance,
}

async fn list_instances(State(state): State<Shared>) -> ApiResult<Json<Vec<Instance>>> {
    Ok(Json(state.db.list(&format!("/instances/{DEFAULT_PROJECT}/"))?))
}

fn find_instance(state: &AppState, name: &str) -> ApiResult<Instance> {
    state
        .db
        .instance(DEFAULT_PROJECT, name)?
        .ok_or_else(|| ApiError::not_found(format!("instance '{name}' not found")))
}

async fn get_instance(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Instance>> {
    Ok(Json(find_instance(&state, &name)?))
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
pub(crate) fn placed_on<'a>(state: &'a AppState, instance: &'a Instance) -> &'a str {
    state.hosts.resolve(&instance.status.host)
}

/// The agent of the host `instance` is placed on.
fn agent_of(state: &AppState, instance: &Instance) -> ApiResult<Arc<dyn HostAgent>> {
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
    let instances = state.db.instances()?;
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
fn check_free_memory(host: &Host, memory_mib: u64) -> ApiResult<()> {
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

/// Runs `request_change` for a change that makes `name` wanted running: under the admission
/// lock, and refused when an instance not wanted running yet does not fit its host's free memory.
fn request_running(
    state: &AppState,
    name: &str,
    kind: &str,
    change: impl Fn(&mut Instance) -> Result<bool, ApiError>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let _admitted = state.admission.lock().unwrap_or_else(|p| p.into_inner());
    let instances = state.db.instances()?;
    if let Some(i) = instances
        .iter()
        .find(|i| i.project == DEFAULT_PROJECT && i.name == name && i.desired != Desired::Running)
    {
        let hosts = host_views(state)?;
        if let Some(host) = hosts.iter().find(|h| h.name == placed_on(state, i)) {
            check_free_memory(host, i.spec.memory_mib)?;
        }
    }
    request_change(state, name, kind, change)
}

/// Chooses among `hosts` (from [`host_views`]) the host for a new instance of `memory_mib`
/// in anti-affinity `group` ("" for none; its members in `members`, from [`group_members`]),
/// on `only` if given, with the reasons.
fn place(
    hosts: &[Host],
    memory_mib: u64,
    policy: Policy,
    only: Option<&str>,
    members: &[(String, String)],
) -> ApiResult<scheduler::Decision> {
    if let ([host], None) = (hosts, only) {
        // One host: the refusal says what is free there, as it always has.
        check_free_memory(host, memory_mib)?;
    }
    let candidates: Vec<Candidate> = hosts.iter().map(|h| candidate(h, members)).collect();
    scheduler::place(&candidates, memory_mib, policy, only).map_err(ApiError::conflict)
}

/// The (host, name) of every instance of anti-affinity `group` but `except` ("" groups none,
/// and reads nothing).
fn group_members(state: &AppState, group: &str, except: &str) -> ApiResult<Vec<(String, String)>> {
    if group.is_empty() {
        return Ok(Vec::new());
    }
    Ok(state
        .db
        .instances()?
        .iter()
        .filter(|i| i.spec.anti_affinity == group && i.name != except && i.desired != Desired::Deleted)
        .map(|i| (placed_on(state, i).to_owned(), i.name.clone()))
        .collect())
}

/// A host as the scheduler weighs it, with the `members` of the group being placed.
fn candidate(host: &Host, members: &[(String, String)]) -> Candidate {
    Candidate {
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

async fn launch(
    State(state): State<Shared>,
    Body(req): Body<LaunchRequest>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    check_name("instance", &req.name).map_err(ApiError::bad_request)?;
    if req.cpus == 0 || req.cpus > MAX_CPUS {
        return Err(ApiError::unprocessable(format!("cpus must be 1 to {MAX_CPUS}, not {}", req.cpus)));
    }
    if req.memory_mib < MIN_MEMORY_MIB {
        return Err(ApiError::unprocessable(format!(
            "memory must be at least {MIN_MEMORY_MIB} MiB, not {}",
            req.memory_mib
        )));
    }
    if req.disk_mib == 0 || req.disk_mib > MAX_DISK_MIB {
        return Err(ApiError::unprocessable(format!(
            "disk must be 1 MiB to 16 TiB, not {} MiB",
            req.disk_mib
        )));
    }
    let image = state.db.image(DEFAULT_PROJECT, &req.image)?.ok_or_else(|| {
        ApiError::unprocessable(format!("image '{}' not found (see `stratus image list`)", req.image))
    })?;
    let needed = image.rootfs_bytes.div_ceil(1 << 20);
    if req.disk_mib < needed {
        return Err(ApiError::unprocessable(format!(
            "disk of {} MiB is smaller than image '{}' ({needed} MiB)",
            req.disk_mib, image.name
        )));
    }
    let net = state
        .db
        .network(DEFAULT_PROJECT, &req.network)?
        .ok_or_else(|| ApiError::unprocessable(format!("network '{}' not found", req.network)))?;
    // From the check of free memory to the record that claims it, no other claim runs.
    let _admitted = state.admission.lock().unwrap_or_else(|p| p.into_inner());
    let hosts = host_views(&state)?;
    if let Some(host) = hosts.iter().max_by_key(|h| h.memory_mib).filter(|h| req.memory_mib > h.memory_mib) {
        return Err(ApiError::unprocessable(format!(
            "memory of {} MiB is more than host {} has ({} MiB)",
            req.memory_mib, host.name, host.memory_mib
        )));
    }
    if let Some(host) = &req.host {
        check_name("host", host).map_err(ApiError::bad_request)?;
    }
    let group = req.anti_affinity.clone().unwrap_or_default();
    if !group.is_empty() {
        check_name("anti-affinity group", &group).map_err(ApiError::bad_request)?;
    }
    let members = group_members(&state, &group, &req.name)?;
    let placement = place(&hosts, req.memory_mib, req.placement, req.host.as_deref(), &members)?;
    if state.db.instance(DEFAULT_PROJECT, &req.name)?.is_some() {
        return Err(ApiError::conflict(format!("instance '{}' already exists", req.name)));
    }
    let id = new_id();
    let ip = ipam::lease(&state.db, &net, &id).map_err(|e| ApiError::conflict(e.to_string()))?;
    let op = Operation::started("launch", &req.name);
    let instance = Instance {
        id: id.clone(),
        name: req.name.clone(),
        project: DEFAULT_PROJECT.into(),
        spec: InstanceSpec {
            image: req.image,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            disk_mib: req.disk_mib,
            network: req.network,
            restart: req.restart,
            anti_affinity: group,
        },
        desired: Desired::Running,
        status: InstanceStatus {
            state: InstanceState::Pending,
            message: String::new(),
            host: placement.host.clone(),
            ip: ip.to_string(),
            mac: network::mac_for(&id),
            cid: u32::from(ip),
            pid: 0,
            started_at: 0,
            failures: 0,
            retry_at: 0,
            boot_ms: 0,
            boot: String::new(),
            moving: String::new(),
            home: String::new(),
        },
        created_at: now(),
        operation: Some(op.id.clone()),
        restart_pending: false,
    };
    state.db.put(&operation_key(&op.id), &op)?;
    if let Err(e) = state.db.create(&instance_key(DEFAULT_PROJECT, &instance.name), &instance) {
        // Lost a race for the name: give the address back.
        let _ = ipam::release(&state.db, &net.name, &instance.status.ip, &id);
        let _ = state.db.delete(&operation_key(&op.id));
        return Err(match e {
            DbError::Exists(_) => ApiError::conflict(format!("instance '{}' already exists", instance.name)),
            other => other.into(),
        });
    }
    state.db.event(
        DEFAULT_PROJECT,
        &instance.name,
        "info",
        format!("created ({} MiB, {} vCPU, address {ip})", instance.spec.memory_mib, instance.spec.cpus),
    );
    state.db.event(DEFAULT_PROJECT, &instance.name, "info", placement.explanation);
    state.reconciler.wake();
    Ok((StatusCode::ACCEPTED, Json(Accepted { operation: op, instance })))
}

/// `POST /v1/instances/{name}/move`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    /// The destination; the scheduler picks one when absent.
    #[serde(default)]
    to: Option<String>,
}

async fn move_instance(
    State(state): State<Shared>,
    Name(name): Name,
    Body(req): Body<MoveRequest>,
) -> ApiResult<Response> {
    if let Some(to) = &req.to {
        check_name("host", to).map_err(ApiError::bad_request)?;
    }
    let prepared = prepare_move(&state, &name, req.to.as_deref())?;
    let (db, hosts) = (state.db.clone(), Arc::clone(&state.hosts));
    let (operation, instance) = (prepared.op.clone(), prepared.instance.clone());
    std::thread::Builder::new()
        .name(format!("move-{name}"))
        .spawn(move || prepared.drive(&db, &hosts))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { operation, instance })).into_response())
}

/// A move checked and recorded: its operation, the instance marked `moving`, its destination
/// and whether it goes live (running) or cold (stopped).
pub struct PreparedMove {
    pub op: Operation,
    pub instance: Instance,
    pub to: String,
    pub live: bool,
}

impl PreparedMove {
    /// Carries the move out (on the caller's thread), ending its operation.
    pub fn drive(self, db: &Db, hosts: &Hosts) {
        match self.live {
            true => crate::moves::run(db, hosts, self.instance, &self.to, &self.op.id),
            false => crate::moves::run_cold(db, hosts, self.instance, &self.to, &self.op.id),
        }
    }
}

/// Checks that `name` can move (running: live; stopped: cold) to `to`, or where the scheduler
/// places it, and records the move (its operation, the instance marked `moving`, an event
/// with the placement's reasons), under the admission lock.
pub fn prepare_move(state: &AppState, name: &str, to: Option<&str>) -> ApiResult<PreparedMove> {
    let _admitted = state.admission.lock().unwrap_or_else(|p| p.into_inner());
    let instance = find_instance(state, name)?;
    let live = instance.status.state == InstanceState::Running && instance.desired == Desired::Running;
    let cold = instance.status.state == InstanceState::Stopped && instance.desired == Desired::Stopped;
    if !live && !cold {
        return Err(ApiError::conflict(format!(
            "instance '{name}' is {}: a running instance moves live, a stopped one cold",
            instance.status.state.as_str()
        )));
    }
    if !instance.status.moving.is_empty() {
        return Err(ApiError::conflict(format!(
            "instance '{name}' is moving to {} already",
            instance.status.moving
        )));
    }
    let source = placed_on(state, &instance).to_owned();
    if to == Some(source.as_str()) {
        return Err(ApiError::conflict(format!("instance '{name}' runs on {source} already")));
    }
    // The destination must have room, as for a launch; the source is no choice.
    let hosts = host_views(state)?;
    let members = group_members(state, &instance.spec.anti_affinity, name)?;
    let candidates: Vec<Candidate> =
        hosts.iter().filter(|h| h.name != source).map(|h| candidate(h, &members)).collect();
    if candidates.is_empty() {
        return Err(ApiError::conflict("there is no other host to move to (see `stratus host list`)"));
    }
    let decision = scheduler::place(&candidates, instance.spec.memory_mib, Policy::Spread, to)
        .map_err(ApiError::conflict)?;
    let op = Operation::started("move", name);
    state.db.put(&operation_key(&op.id), &op)?;
    let to = decision.host.clone();
    let instance = state.db.update(&instance_key(DEFAULT_PROJECT, name), |i: &mut Instance| {
        i.status.moving = to.clone();
        true
    })?;
    let how = if live { "live" } else { "stopped" };
    state.db.event(
        DEFAULT_PROJECT,
        name,
        "info",
        format!("moving {how} from {source} to {to}: {}", decision.explanation),
    );
    Ok(PreparedMove { op, instance, to, live })
}

/// Runs a request only the leader takes: here if this replica leads, else passed to the
/// leading replica, whose answer is returned. These requests claim a host's memory under the
/// admission lock, which is one process's (a launch, a start), or drive moves, which a new
/// leader settles when it finds them under way: two replicas must not both take them.
async fn leader_only(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if state.leadership.is_leader() {
        return next.run(request).await;
    }
    // The route is nested under /v1, which the router took off the path.
    let path = format!("/v1{}", request.uri().path_and_query().map_or("", |p| p.as_str()));
    let body = match axum::body::to_bytes(request.into_body(), MAX_JSON_BODY).await {
        Ok(body) => body,
        Err(e) => return ApiError::bad_request(format!("reading the request: {e}")).into_response(),
    };
    forward_to_leader(&state, path, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Sends a request (`path` and its JSON `body`, as the client sent them) to the leading
/// replica, with this control plane's token; the leader's answer.
async fn forward_to_leader(state: &AppState, path: String, body: axum::body::Bytes) -> ApiResult<Response> {
    let (leadership, token) = (Arc::clone(&state.leadership), state.token.clone());
    let answer = tokio::task::spawn_blocking(move || {
        let (leader, url) = leadership.leader().filter(|(_, url)| !url.is_empty()).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no control plane replica leads right now (one takes over within seconds): try again",
            )
        })?;
        let sent = ureq::post(&format!("{url}{path}"))
            .timeout(Duration::from_secs(30))
            .set("authorization", &format!("Bearer {token}"))
            .set("content-type", "application/json")
            .send_bytes(&body);
        let (status, text) = match sent {
            Ok(response) => (response.status(), response.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(status, response)) => {
                (status, response.into_string().unwrap_or_default())
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the leading replica {leader} ({url}) did not answer: {e}"),
                ))
            }
        };
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        Ok((status, [(axum::http::header::CONTENT_TYPE, "application/json")], text).into_response())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    answer
}

/// Records a new desired state for `name` with an operation of `kind` and wakes the reconciler.
fn request_change(
    state: &AppState,
    name: &str,
    kind: &str,
    change: impl Fn(&mut Instance) -> Result<bool, ApiError>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let op = Operation::started(kind, name);
    // Stored before the instance names it, so a worker that finishes at once finds it.
    state.db.put(&operation_key(&op.id), &op)?;
    let mut refused = None;
    let mut done_now = false;
    let mut superseded = None;
    let key = instance_key(DEFAULT_PROJECT, name);
    let instance = state
        .db
        .update(&key, |i: &mut Instance| {
            refused = None;
            match change(i) {
                Err(e) => {
                    refused = Some(e);
                    false
                }
                Ok(pending) => {
                    superseded = i.operation.replace(op.id.clone());
                    done_now = !pending;
                    if done_now {
                        i.operation = None;
                    }
                    true
                }
            }
        })
        .map_err(|e| match e {
            DbError::NotFound(_) => ApiError::not_found(format!("instance '{name}' not found")),
            other => other.into(),
        });
    let instance = match (instance, refused) {
        (Ok(instance), None) => instance,
        (result, refused) => {
            let _ = state.db.delete(&operation_key(&op.id));
            return Err(
                refused.unwrap_or_else(|| result.err().unwrap_or_else(|| ApiError::bad_request("refused")))
            );
        }
    };
    let mut op = op;
    if done_now {
        op.state = OperationState::Succeeded;
        op.finished_at = now();
        state.db.put(&operation_key(&op.id), &op)?;
    }
    if let Some(old) = superseded.filter(|old| *old != op.id) {
        let _ = state.db.update(&operation_key(&old), |o: &mut Operation| {
            let running = o.state == OperationState::Running;
            if running {
                o.state = OperationState::Failed;
                o.error = format!("superseded by {kind}");
                o.finished_at = now();
            }
            running
        });
    }
    state.db.event(DEFAULT_PROJECT, name, "info", format!("{kind} requested"));
    state.reconciler.wake();
    Ok((StatusCode::ACCEPTED, Json(Accepted { operation: op, instance })))
}

fn refuse_deleted(i: &Instance) -> Result<(), ApiError> {
    if i.desired == Desired::Deleted {
        return Err(ApiError::conflict(format!("instance '{}' is being deleted", i.name)));
    }
    Ok(())
}

async fn start_instance(
    State(state): State<Shared>,
    Name(name): Name,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    request_running(&state, &name, "start", |i| {
        refuse_deleted(i)?;
        if i.desired == Desired::Running && i.status.state == InstanceState::Running {
            return Ok(false);
        }
        i.desired = Desired::Running;
        i.status.failures = 0;
        i.status.retry_at = 0;
        Ok(true)
    })
}

async fn stop_instance(
    State(state): State<Shared>,
    Name(name): Name,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    request_change(&state, &name, "stop", |i| {
        refuse_deleted(i)?;
        i.desired = Desired::Stopped;
        i.restart_pending = false;
        let active = matches!(
            i.status.state,
            InstanceState::Running | InstanceState::Starting | InstanceState::Stopping
        ) || i.status.pid != 0;
        if !active {
            i.status.state = InstanceState::Stopped;
        }
        Ok(active)
    })
}

async fn restart_instance(
    State(state): State<Shared>,
    Name(name): Name,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    request_running(&state, &name, "restart", |i| {
        refuse_deleted(i)?;
        i.desired = Desired::Running;
        i.status.failures = 0;
        i.status.retry_at = 0;
        i.restart_pending = matches!(i.status.state, InstanceState::Running | InstanceState::Starting);
        Ok(true)
    })
}

async fn delete_instance(
    State(state): State<Shared>,
    Name(name): Name,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    request_change(&state, &name, "delete", |i| {
        if i.desired != Desired::Deleted {
            i.status.failures = 0;
        }
        i.desired = Desired::Deleted;
        i.status.retry_at = 0;
        Ok(true)
    })
}

/// `POST /v1/instances/{name}/exec`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: Vec<String>,
    /// Standard input, base64.
    #[serde(default)]
    stdin: String,
    /// Seconds the command may run; then it and every process it started are killed and its
    /// exit code is 137.
    #[serde(default = "default_exec_timeout")]
    timeout_secs: u64,
}

fn default_exec_timeout() -> u64 {
    300
}

/// The longest `timeout_secs` of an exec: a day.
const MAX_EXEC_SECS: u64 = 86_400;
/// Execs running at once through the API; more are refused (503) rather than queued, as each
/// holds a thread of the blocking pool while it runs.
pub const MAX_EXECS: usize = 64;

#[derive(Serialize)]
struct ExecAnswer {
    exit_code: i32,
    /// Whether the command ran past `timeout_secs` and was killed.
    timed_out: bool,
    /// base64.
    stdout: String,
    /// base64.
    stderr: String,
}

async fn exec(
    State(state): State<Shared>,
    Name(name): Name,
    Body(body): Body<ExecBody>,
) -> ApiResult<Json<ExecAnswer>> {
    if body.command.is_empty() || body.command[0].is_empty() {
        return Err(ApiError::bad_request("command must name a program"));
    }
    if body.timeout_secs == 0 || body.timeout_secs > MAX_EXEC_SECS {
        return Err(ApiError::unprocessable(format!(
            "timeout_secs must be 1 to {MAX_EXEC_SECS}, not {}",
            body.timeout_secs
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let stdin =
        b64.decode(&body.stdin).map_err(|e| ApiError::bad_request(format!("stdin is not base64: {e}")))?;
    let instance = find_instance(&state, &name)?;
    if instance.status.state != InstanceState::Running {
        return Err(ApiError::conflict(format!(
            "instance '{name}' is {}, not running",
            instance.status.state.as_str()
        )));
    }
    let permit = Arc::clone(&state.execs).try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_EXECS} commands are running already; try again when one has finished"),
        )
    })?;
    let agent = agent_of(&state, &instance)?;
    let limit = Duration::from_secs(body.timeout_secs);
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        agent.exec(&instance, body.command, stdin, limit)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(Json(ExecAnswer {
        exit_code: output.code,
        timed_out: output.code == 128 + libc::SIGKILL && started.elapsed() >= limit,
        stdout: b64.encode(output.stdout),
        stderr: b64.encode(output.stderr),
    }))
}

async fn instance_metrics(
    State(state): State<Shared>,
    Name(name): Name,
) -> ApiResult<Json<serde_json::Value>> {
    let instance = find_instance(&state, &name)?;
    let agent = agent_of(&state, &instance)?;
    let metrics = tokio::task::spawn_blocking(move || agent.metrics(&instance))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::conflict(e.to_string()))?;
    Ok(Json(metrics))
}

// ---- images, networks, hosts ------------------------------------------------------

async fn list_images(State(state): State<Shared>) -> ApiResult<Json<Vec<Image>>> {
    Ok(Json(state.db.list(&format!("/images/{DEFAULT_PROJECT}/"))?))
}

/// `POST /v1/images`: import from files on the server's host.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    name: String,
    /// The upload (`PUT /v1/uploads/NAME`) holding a raw ext4 root filesystem; or
    #[serde(default)]
    rootfs: Option<String>,
    /// the upload holding a root filesystem tarball (any compression tar reads), made bootable
    /// with the default image's init, busybox and guest agent.
    #[serde(default)]
    tarball: Option<String>,
    /// The upload holding the kernel; the default image's when absent.
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
}

/// Names that are routes under /v1/images.
const RESERVED_IMAGE_NAMES: &[&str] = &["build"];

fn check_image_name(name: &str) -> ApiResult<()> {
    check_name("image", name).map_err(ApiError::bad_request)?;
    if RESERVED_IMAGE_NAMES.contains(&name) {
        return Err(ApiError::bad_request(format!("'{name}' is reserved; choose another image name")));
    }
    Ok(())
}

async fn import_image(
    State(state): State<Shared>,
    Body(req): Body<ImportRequest>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    check_image_name(&req.name)?;
    if req.rootfs.is_some() == req.tarball.is_some() {
        return Err(ApiError::unprocessable("give either rootfs (a raw ext4 image) or tarball"));
    }
    let file =
        |what: &str, name: &Option<String>| name.as_deref().map(|n| uploaded(&state, what, n)).transpose();
    let (kernel, rootfs, tarball, initrd) = (
        file("kernel", &req.kernel)?,
        file("rootfs", &req.rootfs)?,
        file("tarball", &req.tarball)?,
        file("initrd", &req.initrd)?,
    );
    let uploads: Vec<std::path::PathBuf> =
        [&kernel, &rootfs, &tarball, &initrd].into_iter().flatten().cloned().collect();
    let base = state.db.image(DEFAULT_PROJECT, "default")?;
    let kernel = match (kernel, &base) {
        (Some(kernel), _) => kernel,
        (None, Some(base)) => base.kernel.clone().into(),
        (None, None) => {
            return Err(ApiError::unprocessable("no kernel given and no default image to take one from"))
        }
    };
    let cmdline = req.cmdline.clone().or_else(|| base.as_ref().map(|b| b.cmdline.clone()));
    let (db, data, name, agent) =
        (state.db.clone(), state.data_dir.clone(), req.name.clone(), state.hosts.local());
    let image = tokio::task::spawn_blocking(move || {
        let work = data.join("images").join(format!(".{name}-{}.import", new_id()));
        let rootfs = match (rootfs, &tarball, &base) {
            (Some(rootfs), _, _) => rootfs,
            (None, Some(tarball), Some(base)) => crate::image::rootfs_from_tarball(tarball, base, &work)?,
            _ => {
                return Err(crate::image::ImageError::Tarball(
                    "a tarball needs the default image (its init, busybox and agent)".into(),
                ))
            }
        };
        let files = crate::image::ImageFiles {
            kernel,
            initrd,
            rootfs,
            cmdline: cmdline.unwrap_or_else(|| "console=ttyS0 panic=1".into()),
            source: "import".into(),
        };
        let installed = crate::image::install(&db, &data, &name, &files);
        let _ = std::fs::remove_dir_all(&work);
        let image = installed?;
        // The image has its own copies now.
        for upload in &uploads {
            let _ = std::fs::remove_file(upload);
        }
        // Its warm snapshot comes in the background; launches boot cold until then.
        let (db2, image2) = (db.clone(), image.clone());
        if let Some(agent) = agent {
            let _ = std::thread::Builder::new()
                .name(format!("warm-{name}"))
                .spawn(move || crate::image::warm(&db2, agent.as_ref(), &image2));
        }
        Ok(image)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError::unprocessable(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(image)))
}

/// `POST /v1/images/build`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildRequest {
    recipe: String,
    #[serde(default)]
    name: Option<String>,
}

async fn build_image(
    State(state): State<Shared>,
    Body(req): Body<BuildRequest>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    if !crate::image::RECIPES.contains(&req.recipe.as_str()) {
        return Err(ApiError::unprocessable(format!(
            "unknown recipe '{}': known are {}",
            req.recipe,
            crate::image::RECIPES.join(", ")
        )));
    }
    let name = req.name.clone().unwrap_or_else(|| req.recipe.clone());
    check_image_name(&name)?;
    let Some(builder) = state.builder.clone() else {
        return Err(ApiError::conflict(
            "this server cannot build images (started without its guest sources)",
        ));
    };
    let op = Operation::started("image-build", "");
    state.db.put(&operation_key(&op.id), &op)?;
    let (db, data, agent, op_id) =
        (state.db.clone(), state.data_dir.clone(), state.hosts.local(), op.id.clone());
    let recipe = req.recipe;
    std::thread::Builder::new()
        .name(format!("build-{name}"))
        .spawn(move || {
            db.event(DEFAULT_PROJECT, "", "info", format!("image {name}: building from recipe '{recipe}'"));
            let mut progress = |line: &str| {
                // The step lines, not every line a package manager prints.
                if line.starts_with('[') || line.contains("error") {
                    db.event(DEFAULT_PROJECT, "", "info", format!("image {name}: {}", line.trim()));
                }
            };
            let result = builder(&recipe, &mut progress)
                .map_err(|e| format!("{e:#}"))
                .and_then(|dir| crate::image::ImageFiles::of_build(&dir).map_err(|e| e.to_string()))
                .and_then(|files| crate::image::install(&db, &data, &name, &files).map_err(|e| e.to_string()))
                .and_then(|image| match &agent {
                    Some(agent) => crate::image::warm(&db, agent.as_ref(), &image),
                    None => Ok(()),
                });
            if let Err(e) = &result {
                db.event(DEFAULT_PROJECT, "", "error", format!("image {name}: {e}"));
            }
            let _ = db.update(&operation_key(&op_id), |o: &mut Operation| {
                o.state = if result.is_ok() { OperationState::Succeeded } else { OperationState::Failed };
                o.error = result.as_ref().err().cloned().unwrap_or_default();
                o.finished_at = now();
                true
            });
        })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

async fn get_image(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Image>> {
    state
        .db
        .image(DEFAULT_PROJECT, &name)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("image '{name}' not found")))
}

/// The largest file an upload takes.
const MAX_UPLOAD_BYTES: u64 = 1 << 40;

/// Where upload `name` is kept.
fn upload_path(state: &AppState, name: &str) -> std::path::PathBuf {
    state.data_dir.join("uploads").join(name)
}

/// `PUT /v1/uploads/{name}`: a file for an image import (kernel, initrd, root filesystem or
/// tarball), streamed into the server's data directory. Imports name uploads, never host
/// paths: the API reads no file of the host it was not given.
async fn upload(
    State(state): State<Shared>,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    use http_body_util::BodyExt;
    use std::io::Write;
    if !is_resource_name(&name) {
        // Read what the client is sending before answering: closing on a client still
        // writing resets the connection, and it never sees the answer.
        let _ = http_body_util::Limited::new(body, 64 << 20).collect().await;
        return Err(ApiError::not_found(format!("'{}' is not an upload name", name.escape_default())));
    }
    let dir = state.data_dir.join("uploads");
    let io = |what: &str, e: std::io::Error| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} upload '{name}': {e}"))
    };
    std::fs::create_dir_all(&dir).map_err(|e| io("storing", e))?;
    let partial = dir.join(format!(".{name}-{}.partial", new_id()));
    let mut file = std::fs::File::create(&partial).map_err(|e| io("storing", e))?;
    let mut body = body;
    let mut bytes = 0u64;
    let received = loop {
        let frame = match body.frame().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(ApiError::bad_request(format!("upload '{name}' broke off: {e}"))),
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        bytes += data.len() as u64;
        if bytes > MAX_UPLOAD_BYTES {
            break Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("upload '{name}' is over {} GiB", MAX_UPLOAD_BYTES >> 30),
            ));
        }
        if let Err(e) = tokio::task::block_in_place(|| file.write_all(&data)) {
            break Err(io("storing", e));
        }
    };
    let stored = received.and_then(|()| {
        file.sync_all().map_err(|e| io("storing", e))?;
        std::fs::rename(&partial, upload_path(&state, &name)).map_err(|e| io("storing", e))
    });
    if let Err(e) = stored {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "name": name, "bytes": bytes }))))
}

async fn delete_upload(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
    match std::fs::remove_file(upload_path(&state, &name)) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("upload '{name}' not found")))
        }
        Err(e) => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("removing upload '{name}': {e}")))
        }
    }
}

/// The file of the upload an import names; a path or an unknown name is a 422 that says how.
fn uploaded(state: &AppState, what: &str, name: &str) -> ApiResult<std::path::PathBuf> {
    if !is_resource_name(name) {
        return Err(ApiError::unprocessable(format!(
            "{what} '{}' is not an upload name: upload the file first (PUT /v1/uploads/NAME, as `stratus \
             image import` does); the server reads no other files of its host",
            name.escape_default()
        )));
    }
    let path = upload_path(state, name);
    if !path.is_file() {
        return Err(ApiError::unprocessable(format!(
            "{what}: no upload '{name}' (PUT /v1/uploads/{name} first)"
        )));
    }
    Ok(path)
}

async fn delete_image(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
    let image = state
        .db
        .image(DEFAULT_PROJECT, &name)?
        .ok_or_else(|| ApiError::not_found(format!("image '{name}' not found")))?;
    let users: Vec<String> =
        state.db.instances()?.into_iter().filter(|i| i.spec.image == name).map(|i| i.name).collect();
    if !users.is_empty() {
        return Err(ApiError::conflict(format!("image '{name}' is used by {}", users.join(", "))));
    }
    state.db.delete(&image_key(DEFAULT_PROJECT, &name))?;
    if let Some(dir) = std::path::Path::new(&image.rootfs).parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_networks(State(state): State<Shared>) -> ApiResult<Json<Vec<Network>>> {
    Ok(Json(state.db.list(&format!("/networks/{DEFAULT_PROJECT}/"))?))
}

async fn get_network(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Network>> {
    state
        .db
        .network(DEFAULT_PROJECT, &name)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("network '{name}' not found")))
}

/// `POST /v1/networks`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkRequest {
    name: String,
    cidr: String,
    #[serde(default = "yes")]
    nat: bool,
}

fn yes() -> bool {
    true
}

async fn create_network(
    State(state): State<Shared>,
    Body(req): Body<NetworkRequest>,
) -> ApiResult<(StatusCode, Json<Network>)> {
    check_name("network", &req.name).map_err(ApiError::bad_request)?;
    let subnet = Subnet::parse(&req.cidr).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    let existing: Vec<Network> = state.db.list("/networks/")?;
    if existing.iter().any(|n| n.name == req.name) {
        return Err(ApiError::conflict(format!("network '{}' already exists", req.name)));
    }
    if let Some(other) = existing.iter().find(|n| Subnet::parse(&n.cidr).is_ok_and(|s| s.overlaps(&subnet))) {
        return Err(ApiError::conflict(format!(
            "{subnet} overlaps network '{}' ({})",
            other.name, other.cidr
        )));
    }
    let network = Network {
        name: req.name.clone(),
        project: DEFAULT_PROJECT.into(),
        bridge: bridge_name(&req.name, &existing),
        cidr: subnet.to_string(),
        gateway: subnet.gateway().to_string(),
        nat: req.nat,
        created_at: now(),
        peers: Vec::new(),
    };
    state.db.create(&network_key(DEFAULT_PROJECT, &network.name), &network)?;
    // The leader hands it to the hosts now, saying what failed; a follower leaves it to the
    // leader's next pass (two replicas pushing would cross).
    let (sync, leading) = (Arc::clone(&state.networks), state.leadership.is_leader());
    let prepared = tokio::task::spawn_blocking(move || {
        let failures = if leading { sync.pass() } else { Vec::new() };
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    })
    .await;
    if let Err(e) = prepared.map_err(|e| e.to_string()).and_then(|r| r) {
        let _ = state.db.delete(&network_key(DEFAULT_PROJECT, &network.name));
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("setting up network '{}': {e}", network.name),
        ));
    }
    Ok((StatusCode::CREATED, Json(network)))
}

/// A bridge name for a new network: `stratus` plus a number no other network uses.
fn bridge_name(name: &str, existing: &[Network]) -> String {
    let _ = name;
    (1..)
        .map(|n| format!("stratus{n}"))
        .find(|b| existing.iter().all(|n| n.bridge != *b) && !network::tap_exists(b))
        .unwrap_or_else(|| "stratusx".into())
}

async fn delete_network(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
    state
        .db
        .network(DEFAULT_PROJECT, &name)?
        .ok_or_else(|| ApiError::not_found(format!("network '{name}' not found")))?;
    let users: Vec<String> =
        state.db.instances()?.into_iter().filter(|i| i.spec.network == name).map(|i| i.name).collect();
    if !users.is_empty() {
        return Err(ApiError::conflict(format!("network '{name}' is used by {}", users.join(", "))));
    }
    let network = state.db.network(DEFAULT_PROJECT, &name)?;
    state.db.delete(&network_key(DEFAULT_PROJECT, &name))?;
    // The leader takes it off the hosts now; a follower leaves that to the leader's next pass
    // (hosts drop networks missing from the set they are given).
    if let Some(network) = network.filter(|_| state.leadership.is_leader()) {
        let sync = Arc::clone(&state.networks);
        let failures = tokio::task::spawn_blocking(move || sync.remove(&network))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        if !failures.is_empty() {
            let e = failures.join("; ");
            state.db.event(DEFAULT_PROJECT, "", "error", format!("network {name}: removing its bridge: {e}"));
        }
    }
    state.networks.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EvacuateRequest {
    /// Leave stopped instances where they are (they move cold otherwise).
    #[serde(default)]
    keep_stopped: bool,
}

/// `POST /v1/hosts/{name}/evacuate`: maintenance on, every instance moved off (an operation).
async fn evacuate_host(
    State(state): State<Shared>,
    Name(name): Name,
    Body(req): Body<EvacuateRequest>,
) -> ApiResult<Response> {
    let options = if req.keep_stopped { vec!["keep-stopped".to_string()] } else { Vec::new() };
    let op = maintenance_operation(&state, &name, "evacuate", true, options)?;
    let (working, id) = (Arc::clone(&state), op.id.clone());
    std::thread::Builder::new()
        .name(format!("evacuate-{name}"))
        .spawn(move || crate::maintenance::evacuate(&working, &name, req.keep_stopped, &id))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

/// `POST /v1/hosts/{name}/restore`: maintenance off, evacuated instances brought back.
async fn restore_host(State(state): State<Shared>, Name(name): Name) -> ApiResult<Response> {
    let op = maintenance_operation(&state, &name, "restore", false, Vec::new())?;
    let (working, id) = (Arc::clone(&state), op.id.clone());
    std::thread::Builder::new()
        .name(format!("restore-{name}"))
        .spawn(move || crate::maintenance::restore(&working, &name, &id))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

/// `GET /v1/config`: the cluster's settings, defaults filled in.
async fn get_config(State(state): State<Shared>) -> Json<ClusterConfig> {
    Json(crate::rebalance::settings(&state))
}

/// `PATCH /v1/config` `{"rebalance.enabled": "false", ...}`: sets each key, all or none.
async fn set_config(
    State(state): State<Shared>,
    Body(changes): Body<std::collections::BTreeMap<String, serde_json::Value>>,
) -> ApiResult<Json<ClusterConfig>> {
    if changes.is_empty() {
        return Err(ApiError::bad_request("nothing to set: send {\"KEY\": VALUE, ...}"));
    }
    let apply = |config: &mut ClusterConfig| -> Result<(), String> {
        for (key, value) in &changes {
            config.set(key, &setting_text(value))?;
        }
        Ok(())
    };
    // Refused as a whole, before anything is written, whatever is stored.
    apply(&mut ClusterConfig::default()).map_err(ApiError::bad_request)?;
    let stored = state.db.upsert(crate::rebalance::CONFIG_KEY, |config: &mut ClusterConfig| {
        let _ = apply(config);
    })?;
    let summary: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={}", setting_text(v))).collect();
    state.db.event(DEFAULT_PROJECT, "", "info", format!("settings changed: {}", summary.join(", ")));
    Ok(Json(stored))
}

/// A setting's value as the user would write it: `false`, `60`, `"false"` all as text.
fn setting_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `GET /v1/consolidation`: the moves that would pack the instances onto as few hosts as fit,
/// and the hosts that would be left empty.
async fn consolidation_plan(State(state): State<Shared>) -> ApiResult<Json<ConsolidationPlan>> {
    Ok(Json(consolidation(&state)?))
}

/// `POST /v1/consolidation`: carries out the plan of the moment (an operation): the hosts to
/// empty go into maintenance first, so that nothing new lands on them, and stay in it.
async fn consolidate_hosts(State(state): State<Shared>) -> ApiResult<Response> {
    let plan = consolidation(&state)?;
    for host in &plan.emptied {
        crate::maintenance::set_maintenance(&state, host, true)?;
    }
    let mut op = Operation::started("consolidate", "");
    op.hosts = plan.emptied.clone();
    state.db.put(&operation_key(&op.id), &op)?;
    let summary = if plan.emptied.is_empty() {
        "nothing to consolidate: no host can be emptied".to_string()
    } else {
        format!(
            "consolidating: emptying {} ({} moves); they stay in maintenance",
            plan.emptied.join(", "),
            plan.moves.len()
        )
    };
    state.db.event(DEFAULT_PROJECT, "", "info", summary);
    let (working, id) = (Arc::clone(&state), op.id.clone());
    std::thread::Builder::new()
        .name("consolidate".into())
        .spawn(move || crate::maintenance::consolidate(&working, &plan, &id))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

/// The consolidation plan of the cluster as it is now.
fn consolidation(state: &AppState) -> ApiResult<ConsolidationPlan> {
    let instances = state.db.instances()?;
    let loads: Vec<crate::consolidate::HostLoad> = host_views(state)?
        .into_iter()
        .map(|host| crate::consolidate::HostLoad {
            usable: host.state == "online" && !host.maintenance,
            cpus: host.cpus,
            allocatable_mib: host.allocatable_mib,
            instances: instances
                .iter()
                .filter(|i| placed_on(state, i) == host.name && i.desired != Desired::Deleted)
                .map(|i| {
                    let holds = i.desired == Desired::Running;
                    crate::consolidate::Resident {
                        name: i.name.clone(),
                        memory_mib: if holds { i.spec.memory_mib } else { 0 },
                        cpus: if holds { i.spec.cpus } else { 0 },
                        group: i.spec.anti_affinity.clone(),
                    }
                })
                .collect(),
            name: host.name,
        })
        .collect();
    Ok(crate::consolidate::plan(&loads))
}

/// Sets host `name`'s maintenance to `on` and records an operation of `kind` for the moves.
fn maintenance_operation(
    state: &AppState,
    name: &str,
    kind: &str,
    on: bool,
    options: Vec<String>,
) -> ApiResult<Operation> {
    if state.db.get::<Host>(&crate::db::host_key(name))?.is_none() {
        return Err(ApiError::not_found(format!("host '{name}' not found")));
    }
    crate::maintenance::set_maintenance(state, name, on)?;
    let mut op = Operation::started(kind, "");
    op.hosts = vec![name.to_string()];
    op.options = options;
    state.db.put(&operation_key(&op.id), &op)?;
    let what = if on {
        "in maintenance: no new placements; moving its instances off"
    } else {
        "out of maintenance: bringing its instances back"
    };
    state.db.event(DEFAULT_PROJECT, "", "info", format!("host {name} {what}"));
    Ok(op)
}

/// `GET /v1/control`: which replica answered, and which leads.
#[derive(Serialize)]
struct ControlView {
    /// The replica that answered this request.
    replica: String,
    /// The replica that leads (runs the reconcilers), empty while none does.
    leader: String,
    /// Whether the replica that answered leads.
    leading: bool,
}

async fn get_control(State(state): State<Shared>) -> ApiResult<Json<ControlView>> {
    let leadership = Arc::clone(&state.leadership);
    let leader = tokio::task::spawn_blocking(move || leadership.leader())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(ControlView {
        replica: state.leadership.name().to_string(),
        leader: leader.map(|(name, _)| name).unwrap_or_default(),
        leading: state.leadership.is_leader(),
    }))
}

async fn list_hosts(State(state): State<Shared>) -> ApiResult<Json<Vec<Host>>> {
    Ok(Json(host_views(&state)?))
}

async fn get_host(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Host>> {
    host_views(&state)?
        .into_iter()
        .find(|h| h.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("host '{name}' not found")))
}

/// `POST /v1/hosts`: a join token for a new host.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddHostRequest {
    name: String,
    /// How long the token is good for (default an hour, at most a day).
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// A join token and how to use it.
#[derive(Serialize)]
struct AddHostAnswer {
    #[serde(flatten)]
    invitation: crate::cluster::Invitation,
    /// The command that joins the host, to run there (address and URL to check).
    command: String,
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

async fn add_host(
    State(state): State<Shared>,
    headers: HeaderMap,
    Body(req): Body<AddHostRequest>,
) -> ApiResult<(StatusCode, Json<AddHostAnswer>)> {
    check_name("host", &req.name).map_err(ApiError::bad_request)?;
    let ttl = match req.ttl_secs {
        None => crate::cluster::JOIN_TOKEN_TTL,
        Some(secs @ 1..=86_400) => Duration::from_secs(secs),
        Some(secs) => {
            return Err(ApiError::unprocessable(format!("ttl_secs must be 1 to 86400, not {secs}")))
        }
    };
    let invitation = state.cluster.invite(&req.name, ttl)?;
    let url = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| "http://CONTROL:7440".to_string(), |h| format!("http://{h}"));
    let command = format!(
        "stratus agent --control {url} --join-token {} --name {} --address ADDRESS",
        invitation.token, invitation.host
    );
    state.db.event(DEFAULT_PROJECT, "", "info", format!("host {}: join token issued", invitation.host));
    Ok((StatusCode::CREATED, Json(AddHostAnswer { invitation, command })))
}

async fn remove_host(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
    let cluster_state = Arc::clone(&state);
    let name2 = name.clone();
    tokio::task::spawn_blocking(move || {
        cluster_state.cluster.remove(&name2)?;
        cluster_state.networks.forget(&name2);
        cluster_state.networks.wake();
        Ok::<(), crate::cluster::ClusterError>(())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    state.db.event(DEFAULT_PROJECT, "", "info", format!("host {name}: removed from the cluster"));
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /agent/v1/join`: an agent trades its join token for its host's credential.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    token: String,
    host: stratus_protocol::HostInfo,
}

#[derive(Serialize)]
struct JoinAnswer {
    credential: String,
    protocol: u32,
}

async fn agent_join(
    State(state): State<Shared>,
    Body(req): Body<JoinRequest>,
) -> ApiResult<Json<JoinAnswer>> {
    check_name("host", &req.host.name).map_err(ApiError::bad_request)?;
    let joining = Arc::clone(&state);
    let host = req.host.clone();
    let credential = tokio::task::spawn_blocking(move || joining.cluster.join(&req.token, &host))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    state.db.event(
        DEFAULT_PROJECT,
        "",
        "info",
        format!(
            "host {} joined from {} ({} CPUs, {} MiB)",
            req.host.name, req.host.address, req.host.cpus, req.host.memory_mib
        ),
    );
    // Its networks, and every other host's VXLANs to it.
    state.networks.forget(&req.host.name);
    state.networks.wake();
    state.reconciler.wake();
    Ok(Json(JoinAnswer { credential, protocol: stratus_protocol::PROTOCOL_VERSION }))
}

/// `POST /agent/v1/heartbeat`, with the host's credential as the bearer token.
async fn agent_heartbeat(
    State(state): State<Shared>,
    headers: HeaderMap,
    Body(info): Body<stratus_protocol::HostInfo>,
) -> ApiResult<StatusCode> {
    let secret = bearer(&headers);
    let beating = Arc::clone(&state);
    tokio::task::spawn_blocking(move || {
        beating.cluster.authenticate(&info.name, &secret)?;
        beating.cluster.heartbeat(&info)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}

/// The bearer token of a request ("" without one).
fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentQuery {
    host: String,
}

/// `GET /agent/v1/images/{dir}/{file}?host=NAME`, with host NAME's credential as the bearer
/// token: a file of an image this control plane keeps, for an agent copying it
/// (`stratus_agent::images`). Only the files of images on record are served.
async fn agent_image_file(
    State(state): State<Shared>,
    Path((dir, file)): Path<(String, String)>,
    Params(query): Params<AgentQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let secret = bearer(&headers);
    let (checking, host) = (Arc::clone(&state), query.host.clone());
    tokio::task::spawn_blocking(move || checking.cluster.authenticate(&host, &secret))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    if !stratus_agent::images::valid_dir(&dir) || !stratus_agent::images::IMAGE_FILES.contains(&file.as_str())
    {
        return Err(ApiError::bad_request(format!("no image file '{dir}/{file}'")));
    }
    let path = state.data_dir.join("images").join(&dir).join(&file);
    let shown = path.display().to_string();
    let on_record = state.db.list::<Image>("/images/")?.iter().any(|image| {
        image.kernel == shown || image.rootfs == shown || image.initrd.as_deref() == Some(shown.as_str())
    });
    let opened = if on_record { std::fs::File::open(&path).ok() } else { None };
    let Some(opened) = opened else {
        return Err(ApiError::not_found(format!("no image file '{dir}/{file}' here")));
    };
    let length =
        opened.metadata().map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?.len();
    state.db.event(
        DEFAULT_PROJECT,
        "",
        "info",
        format!("host {}: copying image file {dir}/{file} ({} MiB)", query.host, length >> 20),
    );
    Ok(axum::body::Body::new(FileBody::spawn(opened, length)).into_response())
}

/// A file's bytes as a response body, read on a blocking thread a MiB at a time.
struct FileBody {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<axum::body::Bytes>>,
    length: u64,
}

impl FileBody {
    fn spawn(mut file: std::fs::File, length: u64) -> FileBody {
        let (send, chunks) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            loop {
                let mut buffer = vec![0; 1 << 20];
                let chunk = match file.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => {
                        buffer.truncate(n);
                        Ok(axum::body::Bytes::from(buffer))
                    }
                    Err(e) => Err(e),
                };
                let failed = chunk.is_err();
                if send.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        FileBody { chunks, length }
    }
}

impl http_body::Body for FileBody {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.chunks.poll_recv(cx).map(|chunk| chunk.map(|c| c.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.length)
    }
}

// ---- operations and events ---------------------------------------------------------

async fn get_operation(State(state): State<Shared>, Name(id): Name) -> ApiResult<Json<Operation>> {
    state
        .db
        .operation(&id)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("operation '{id}' not found")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Seconds, at most 300.
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    token: Option<String>,
}

async fn wait_operation(
    State(state): State<Shared>,
    Name(id): Name,
    Params(query): Params<WaitQuery>,
) -> ApiResult<Json<Operation>> {
    let _ = query.token;
    let deadline = Instant::now() + Duration::from_secs(query.timeout.unwrap_or(60).min(300));
    // Woken by a watch on the operation's key from the store revision it was read at: the
    // answer goes out as soon as the operation changes. Past MAX_WATCHED_WAITS waits at once,
    // the others read it every 50 ms instead of holding a thread each.
    let key = operation_key(&id);
    let watched = Arc::clone(&state.waits).try_acquire_owned().ok();
    loop {
        let listing = state.db.store().range(&key).map_err(DbError::from)?;
        let op: Operation = listing
            .entries
            .iter()
            .find(|e| e.key == key)
            .and_then(|e| serde_json::from_slice(&e.value).ok())
            .ok_or_else(|| ApiError::not_found(format!("operation '{id}' not found")))?;
        let revision = listing.revision;
        let left = deadline.saturating_duration_since(Instant::now());
        if op.state != OperationState::Running || left.is_zero() {
            return Ok(Json(op));
        }
        if watched.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let store = Arc::clone(state.db.store());
        let key = key.clone();
        let changed = tokio::task::spawn_blocking(move || match store.watch_from(&key, revision) {
            Ok(watch) => watch.recv_timeout(left).is_some(),
            // Compacted or broken: read again (a short pause keeps a broken store from spinning).
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                true
            }
        })
        .await
        .unwrap_or(true);
        if !changed {
            return Ok(Json(op));
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    instance: Option<String>,
    /// Only events after this time (Unix milliseconds).
    #[serde(default)]
    after: u64,
    #[serde(default)]
    token: Option<String>,
}

async fn list_events(
    State(state): State<Shared>,
    Params(query): Params<EventsQuery>,
) -> ApiResult<Json<Vec<stratus_api::model::Event>>> {
    let _ = query.token;
    Ok(Json(state.db.events(query.instance.as_deref(), query.after)?))
}
