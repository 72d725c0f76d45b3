//! Networks: create, show, list, delete.

use super::*;

pub(super) async fn list_networks(State(state): State<Shared>) -> ApiResult<Json<Vec<Network>>> {
    Ok(Json(state.db.list(&format!("/networks/{DEFAULT_PROJECT}/"))?))
}

pub(super) async fn get_network(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Network>> {
    state
        .db
        .network(DEFAULT_PROJECT, &name)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("network '{name}' not found")))
}

/// `POST /v1/networks`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NetworkRequest {
    name: String,
    cidr: String,
    #[serde(default = "yes")]
    nat: bool,
}

pub(super) fn yes() -> bool {
    true
}

pub(super) async fn create_network(
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
pub(super) fn bridge_name(name: &str, existing: &[Network]) -> String {
    let _ = name;
    (1..)
        .map(|n| format!("stratus{n}"))
        .find(|b| existing.iter().all(|n| n.bridge != *b) && !network::tap_exists(b))
        .unwrap_or_else(|| "stratusx".into())
}

pub(super) async fn delete_network(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
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
