//! Instances: launch, show, list, start, stop, restart, delete, move, exec and metrics.

use super::*;
use crate::moves::prepare_move;

/// `POST /v1/instances`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LaunchRequest {
    #[schemars(regex(pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    name: String,
    #[serde(default = "default_image")]
    image: String,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    cpus: u32,
    #[serde(default = "default_memory")]
    #[schemars(range(min = 32))]
    memory_mib: u64,
    #[serde(default = "default_disk")]
    #[schemars(range(min = 1))]
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
    #[schemars(regex(pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    anti_affinity: Option<String>,
    /// Restart it on another host when its host fails (its disk on the shared pool).
    #[serde(default)]
    ha: bool,
    /// Where its disk lives: `local` (the default) or `shared` (the default with `ha`).
    #[serde(default)]
    pool: Option<Pool>,
}

pub(super) fn default_image() -> String {
    "default".into()
}

pub(super) fn default_network() -> String {
    "default".into()
}

pub(super) fn one() -> u32 {
    1
}

pub(super) fn default_memory() -> u64 {
    256
}

pub(super) fn default_disk() -> u64 {
    1024
}

/// Largest instance sizes accepted at all (the host's capacity is checked separately).
pub(super) const MAX_CPUS: u32 = 64;

pub(super) const MIN_MEMORY_MIB: u64 = 32;

pub(super) const MAX_DISK_MIB: u64 = 16 << 20;

#[derive(Serialize, JsonSchema)]
pub(super) struct Accepted {
    operation: Operation,
    instance: Instance,
}

pub(super) async fn list_instances(State(state): State<Shared>) -> ApiResult<Json<Vec<Instance>>> {
    Ok(Json(state.db.list(&format!("/instances/{DEFAULT_PROJECT}/"))?))
}

pub(super) async fn get_instance(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Instance>> {
    Ok(Json(find_instance(&state, &name)?))
}

/// Runs `request_change` for a change that makes `name` wanted running: under the admission
/// lock, and refused when an instance not wanted running yet does not fit its host's free memory.
pub(super) fn request_running(
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
        let hosts = hosts_of(state, &instances)?;
        if let Some(host) = hosts.iter().find(|h| h.name == placed_on(state, i)) {
            check_free_memory(host, i.spec.memory_mib)?;
        }
    }
    request_change(state, name, kind, change)
}

/// Chooses among `hosts` (from [`host_views`]) the host for a new instance of `memory_mib`
/// in anti-affinity `group` ("" for none; its members in `members`, from [`group_members`]),
/// on `only` if given, with the reasons.
pub(super) fn place(
    hosts: &[Host],
    memory_mib: u64,
    policy: Policy,
    only: Option<&str>,
    members: &[(String, String)],
    pool: Pool,
) -> ApiResult<scheduler::Decision> {
    if let ([host], None) = (hosts, only) {
        // One host: the refusal says what is free there, as it always has.
        check_free_memory(host, memory_mib)?;
    }
    let candidates: Vec<Candidate> = hosts.iter().map(|h| candidate(h, members, pool)).collect();
    scheduler::place(&candidates, memory_mib, policy, only).map_err(ApiError::conflict)
}

pub(super) async fn launch(
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
    let instances = state.db.instances()?;
    let hosts = hosts_of(&state, &instances)?;
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
    let pool = match (req.pool, req.ha) {
        (Some(Pool::Local), true) => {
            return Err(ApiError::unprocessable(
                "ha needs the disk on the shared pool (another host starts the instance from it): leave pool out or make it shared",
            ))
        }
        (Some(pool), _) => pool,
        (None, ha) => if ha { Pool::Shared } else { Pool::Local },
    };
    let members = group_members(&state, &instances, &group, &req.name);
    let placement = place(&hosts, req.memory_mib, req.placement, req.host.as_deref(), &members, pool)?;
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
            pool,
            ha: req.ha,
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
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveRequest {
    /// The destination; the scheduler picks one when absent.
    #[serde(default)]
    to: Option<String>,
}

pub(super) async fn move_instance(
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

/// Records a new desired state for `name` with an operation of `kind` and wakes the reconciler.
pub(super) fn request_change(
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

pub(super) fn refuse_deleted(i: &Instance) -> Result<(), ApiError> {
    if i.desired == Desired::Deleted {
        return Err(ApiError::conflict(format!("instance '{}' is being deleted", i.name)));
    }
    Ok(())
}

pub(super) async fn start_instance(
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

pub(super) async fn stop_instance(
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

pub(super) async fn restart_instance(
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

pub(super) async fn delete_instance(
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
#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "ExecRequest")]
#[serde(deny_unknown_fields)]
pub(super) struct ExecBody {
    #[schemars(length(min = 1))]
    command: Vec<String>,
    /// Standard input, base64.
    #[serde(default)]
    stdin: String,
    /// Seconds the command may run; then it and every process it started are killed and its
    /// exit code is 137.
    #[serde(default = "default_exec_timeout")]
    timeout_secs: u64,
}

pub(super) fn default_exec_timeout() -> u64 {
    300
}

/// The longest `timeout_secs` of an exec: a day.
pub(super) const MAX_EXEC_SECS: u64 = 86_400;

#[derive(Serialize, JsonSchema)]
#[schemars(rename = "ExecResult")]
pub(super) struct ExecAnswer {
    exit_code: i32,
    /// Whether the command ran past `timeout_secs` and was killed.
    timed_out: bool,
    /// base64.
    stdout: String,
    /// base64.
    stderr: String,
}

pub(super) async fn exec(
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

pub(super) async fn instance_metrics(
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
