//! The REST API, versioned under `/v1/`: JSON in and out, a bearer token on every call, errors
//! as `{"error": "..."}` with a 4xx status that changes nothing. Creation is asynchronous: the
//! API records the desired state, wakes the reconciler and answers `202` with an operation
//! that `GET /v1/operations/{id}/wait` waits on. `/openapi.json` describes every route.

use std::sync::atomic::Ordering;
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
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use stratus_agent::network::{self, Subnet};
use stratus_api::model::{
    check_name, new_id, now, ClusterConfig, ConsolidationPlan, Desired, Host, Image, Instance, InstanceSpec,
    InstanceState, InstanceStatus, Network, Operation, OperationState, Pool, RestartPolicy, DEFAULT_PROJECT,
};

use crate::db::{image_key, instance_key, network_key, operation_key, DbError};
use crate::ipam;
use crate::scheduler::{self, Candidate, Policy};
use crate::state::{
    agent_of, candidate, check_free_memory, find_instance, group_members, host_views, hosts_of, placed_on,
    MAX_EXECS,
};
pub use crate::state::{ApiError, ApiResult, AppState};

mod agents;
pub mod console;
pub mod dashboard;
mod hosts;
mod images;
mod instances;
pub mod metrics;
mod networks;
pub mod openapi;
mod operations;

use self::{agents::*, hosts::*, images::*, instances::*, networks::*, operations::*};

/// The largest JSON request body (axum's own limit for `Json`).
const MAX_JSON_BODY: usize = 2 << 20;

type Shared = Arc<AppState>;

/// A JSON error response, for handlers that answer with something other than JSON.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(serde_json::json!({ "error": self.message() }))).into_response()
    }
}

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
        .route("/instances/{name}/console", get(console::console))
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
        .route("/image-files/{dir}/{file}", get(replica_image_file))
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
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/metrics", get(metrics::prometheus))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(dashboard::routes())
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

/// The bearer token of a request ("" without one).
fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}
