//! The agent's side of the protocol over HTTP: a router that checks the credential and the
//! protocol version, then hands each request to an [`Agent`] on a blocking thread.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::{
    Agent, AgentError, ExecRequest, InstanceOrder, NetworkConfig, SendRequest, PROTOCOL_VERSION,
    VERSION_HEADER,
};

struct Served {
    agent: Arc<dyn Agent>,
    credential: String,
}

type Shared = Arc<Served>;

/// The agent API under `/v1`, answering only callers with `credential`.
pub fn router(agent: Arc<dyn Agent>, credential: String) -> Router {
    let state = Arc::new(Served { agent, credential });
    let v1 = Router::new()
        .route("/host", get(host))
        .route("/networks", put(set_networks))
        .route("/instances", get(instances))
        .route("/usage", get(usage))
        .route("/instances/{id}", get(observe).put(ensure))
        .route("/instances/{id}/exec", post(exec))
        .route("/instances/{id}/metrics", get(metrics))
        .route("/instances/{id}/console", get(console))
        .route("/instances/{id}/disk", get(disk_layout))
        .route("/instances/{id}/disk/chunk", get(read_disk).put(write_disk))
        .route("/instances/{id}/receive", post(receive))
        .route("/instances/{id}/send", post(send))
        .fallback(|| async { failure(AgentError::Refused("no such agent route".into())) })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), check_caller));
    Router::new().nest("/v1", v1).with_state(state)
}

/// An error answer: status, one line, and its kind for the client to rebuild the error.
fn failure(error: AgentError) -> Response {
    let (status, kind) = match &error {
        AgentError::Refused(_) => (StatusCode::BAD_REQUEST, "refused"),
        AgentError::NotRunning => (StatusCode::CONFLICT, "not_running"),
        AgentError::Failed(_) | AgentError::Unreachable(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
    };
    (status, Json(serde_json::json!({ "error": error.to_string(), "kind": kind }))).into_response()
}

async fn check_caller(
    State(state): State<Shared>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let token =
        headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let right =
        token.is_some_and(|token| crate::constant_time_eq(token.as_bytes(), state.credential.as_bytes()));
    if !right {
        let mut response = failure(AgentError::Refused("wrong or missing host credential".into()));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let version = headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("none");
    if version != PROTOCOL_VERSION.to_string() {
        return failure(AgentError::Refused(format!(
            "protocol version {version} asked, this agent speaks {PROTOCOL_VERSION}: upgrade the older side"
        )));
    }
    next.run(request).await
}

/// Runs `work` against the agent on a blocking thread and answers with its JSON.
async fn blocking<T: serde::Serialize + Send + 'static>(
    state: Shared,
    work: impl FnOnce(&dyn Agent) -> Result<T, AgentError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(move || work(state.agent.as_ref())).await {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(error)) => failure(error),
        Err(panic) => failure(AgentError::Failed(format!("the agent's worker failed: {panic}"))),
    }
}

async fn host(State(state): State<Shared>) -> Response {
    blocking(state, |agent| agent.host()).await
}

async fn set_networks(State(state): State<Shared>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<Vec<NetworkConfig>>(&body) {
        Ok(networks) => blocking(state, move |agent| agent.set_networks(&networks)).await,
        Err(e) => failure(AgentError::Refused(format!("bad network list: {e}"))),
    }
}

async fn instances(State(state): State<Shared>) -> Response {
    blocking(state, |agent| agent.instances()).await
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

async fn observe(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(after): Query<After>,
) -> Response {
    blocking(state, move |agent| {
        crate::check_id(&id)?;
        agent.observe(&id, after.after)
    })
    .await
}

/// The order in a request's body, for the instance `id` of its path.
fn order_for(id: &str, body: &[u8]) -> Result<InstanceOrder, AgentError> {
    let order = serde_json::from_slice::<InstanceOrder>(body)
        .map_err(|e| AgentError::Refused(format!("bad order: {e}")))?;
    if order.id != id {
        return Err(AgentError::Refused("the order's id is not the one in the path".into()));
    }
    crate::check_id(&order.id)?;
    Ok(order)
}

async fn ensure(State(state): State<Shared>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    match order_for(&id, &body) {
        Ok(order) => blocking(state, move |agent| agent.ensure(&order)).await,
        Err(refused) => failure(refused),
    }
}

async fn exec(State(state): State<Shared>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<ExecRequest>(&body) {
        Ok(request) => {
            blocking(state, move |agent| {
                crate::check_id(&id)?;
                agent.exec(&id, &request)
            })
            .await
        }
        Err(e) => failure(AgentError::Refused(format!("bad exec request: {e}"))),
    }
}

async fn metrics(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    blocking(state, move |agent| {
        crate::check_id(&id)?;
        agent.metrics(&id)
    })
    .await
}

async fn usage(State(state): State<Shared>) -> Response {
    blocking(state, move |agent| agent.usage()).await
}

async fn disk_layout(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    blocking(state, move |agent| {
        crate::check_id(&id)?;
        agent.disk_layout(&id)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    length: u64,
    #[serde(default)]
    size: u64,
}

async fn read_disk(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<ChunkQuery>,
) -> Response {
    blocking(state, move |agent| {
        crate::check_id(&id)?;
        if query.length > crate::DISK_CHUNK {
            return Err(AgentError::Refused(format!("at most {} bytes a call", crate::DISK_CHUNK)));
        }
        agent.read_disk(&id, query.offset, query.length)
    })
    .await
}

async fn write_disk(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(query): Query<ChunkQuery>,
    body: axum::body::Bytes,
) -> Response {
    match serde_json::from_slice::<crate::DiskChunk>(&body) {
        Ok(chunk) => {
            blocking(state, move |agent| {
                crate::check_id(&id)?;
                agent.write_disk(&id, query.size, &chunk).map(|()| serde_json::json!({}))
            })
            .await
        }
        Err(e) => failure(AgentError::Refused(format!("bad disk chunk: {e}"))),
    }
}

/// Upgrades to a WebSocket bridged to the instance's console (the control plane proxies it).
async fn console(
    State(state): State<Shared>,
    Path(id): Path<String>,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let opened = tokio::task::spawn_blocking(move || {
        crate::check_id(&id)?;
        state.agent.console(&id)
    })
    .await;
    match opened {
        Ok(Ok(console)) => upgrade.on_upgrade(move |socket| crate::console::bridge(socket, console)),
        Ok(Err(error)) => failure(error),
        Err(panic) => failure(AgentError::Failed(format!("the agent's worker failed: {panic}"))),
    }
}

async fn receive(State(state): State<Shared>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    match order_for(&id, &body) {
        Ok(order) => blocking(state, move |agent| agent.receive(&order)).await,
        Err(refused) => failure(refused),
    }
}

async fn send(State(state): State<Shared>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<SendRequest>(&body) {
        Ok(request) if request.to.starts_with("tcp:") => {
            blocking(state, move |agent| {
                crate::check_id(&id)?;
                agent.send(&id, &request.to, &request.secret)
            })
            .await
        }
        Ok(request) => failure(AgentError::Refused(format!("'{}' is not tcp:HOST:PORT", request.to))),
        Err(e) => failure(AgentError::Refused(format!("bad send request: {e}"))),
    }
}
