//! Hosts and the policies over them: invite, list, show, remove, evacuate, restore,
//! consolidate; the cluster's settings; which replica leads.

use super::*;

#[derive(Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EvacuateRequest {
    /// Leave stopped instances where they are (they move cold otherwise).
    #[serde(default)]
    keep_stopped: bool,
}

/// `POST /v1/hosts/{name}/evacuate`: maintenance on, every instance moved off (an operation).
pub(super) async fn evacuate_host(
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
pub(super) async fn restore_host(State(state): State<Shared>, Name(name): Name) -> ApiResult<Response> {
    let op = maintenance_operation(&state, &name, "restore", false, Vec::new())?;
    let (working, id) = (Arc::clone(&state), op.id.clone());
    std::thread::Builder::new()
        .name(format!("restore-{name}"))
        .spawn(move || crate::maintenance::restore(&working, &name, &id))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

/// `GET /v1/config`: the cluster's settings, defaults filled in.
pub(super) async fn get_config(State(state): State<Shared>) -> Json<ClusterConfig> {
    Json(crate::rebalance::settings(&state))
}

/// `PATCH /v1/config` `{"rebalance.enabled": "false", ...}`: sets each key, all or none.
pub(super) async fn set_config(
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
pub(super) fn setting_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `GET /v1/consolidation`: the moves that would pack the instances onto as few hosts as fit,
/// and the hosts that would be left empty.
pub(super) async fn consolidation_plan(State(state): State<Shared>) -> ApiResult<Json<ConsolidationPlan>> {
    Ok(Json(consolidation(&state)?))
}

/// `POST /v1/consolidation`: carries out the plan of the moment (an operation): the hosts to
/// empty go into maintenance first, so that nothing new lands on them, and stay in it.
pub(super) async fn consolidate_hosts(State(state): State<Shared>) -> ApiResult<Response> {
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
pub(super) fn consolidation(state: &AppState) -> ApiResult<ConsolidationPlan> {
    let instances = state.db.instances()?;
    let loads: Vec<crate::consolidate::HostLoad> = crate::state::hosts_of(state, &instances)?
        .into_iter()
        .map(|host| crate::consolidate::HostLoad {
            usable: host.state == "online" && !host.maintenance,
            cpus: host.cpus,
            allocatable_mib: host.allocatable_mib,
            shared_pool: host.shared_pool,
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
                        shared: i.spec.pool == stratus_api::model::Pool::Shared,
                    }
                })
                .collect(),
            name: host.name,
        })
        .collect();
    Ok(crate::consolidate::plan(&loads))
}

/// Sets host `name`'s maintenance to `on` and records an operation of `kind` for the moves.
pub(super) fn maintenance_operation(
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
#[derive(Serialize, JsonSchema)]
pub(super) struct ControlView {
    /// The replica that answered this request.
    replica: String,
    /// The replica that leads (runs the reconcilers), empty while none does.
    leader: String,
    /// Whether the replica that answered leads.
    leading: bool,
}

pub(super) async fn get_control(State(state): State<Shared>) -> ApiResult<Json<ControlView>> {
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

pub(super) async fn list_hosts(State(state): State<Shared>) -> ApiResult<Json<Vec<Host>>> {
    Ok(Json(host_views(&state)?))
}

pub(super) async fn get_host(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Host>> {
    host_views(&state)?
        .into_iter()
        .find(|h| h.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("host '{name}' not found")))
}

/// `POST /v1/hosts`: a join token for a new host.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AddHostRequest {
    #[schemars(regex(pattern = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    name: String,
    /// How long the token is good for (default an hour, at most a day).
    #[serde(default)]
    #[schemars(range(min = 1, max = 86400))]
    ttl_secs: Option<u64>,
}

/// A join token and how to use it.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "Invitation")]
pub(super) struct AddHostAnswer {
    #[serde(flatten)]
    invitation: crate::cluster::Invitation,
    /// The command that joins the host, to run there (address and URL to check).
    command: String,
}

pub(super) async fn add_host(
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

pub(super) async fn remove_host(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
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
