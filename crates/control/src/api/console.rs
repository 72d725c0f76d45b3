//! An instance's serial console over a WebSocket (`GET /v1/instances/{name}/console`): binary
//! messages carry the console's bytes both ways, bridged to the VMM's console socket on this
//! machine, or through the agent of the host the instance runs on. The CLI's `stratus console`
//! and the dashboard's terminal both use it.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use stratus_api::model::{InstanceState, DEFAULT_PROJECT};

use crate::api::{AppState, Name};

/// Upgrades to a WebSocket attached to the instance's console.
pub async fn console(
    State(state): State<Arc<AppState>>,
    Name(name): Name,
    upgrade: WebSocketUpgrade,
) -> Response {
    let instance = match state.db.instance(DEFAULT_PROJECT, &name) {
        Ok(Some(i)) => i,
        Ok(None) => {
            return crate::api::error(
                axum::http::StatusCode::NOT_FOUND,
                format!("instance '{name}' not found"),
            )
        }
        Err(e) => return crate::api::error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if instance.status.state != InstanceState::Running {
        return crate::api::error(
            axum::http::StatusCode::CONFLICT,
            format!("instance '{name}' is {}, not running", instance.status.state.as_str()),
        );
    }
    let Some(agent) = state.hosts.get(&instance.status.host) else {
        return crate::api::error(
            axum::http::StatusCode::CONFLICT,
            format!(
                "instance '{name}' is on host '{}', which is not part of the cluster",
                instance.status.host
            ),
        );
    };
    // This machine's VMM socket, or another host's through its agent.
    let opened = tokio::task::spawn_blocking(move || agent.console(&instance)).await;
    let console = match opened {
        Ok(Ok(console)) => console,
        Ok(Err(e)) => {
            return crate::api::error(
                axum::http::StatusCode::BAD_GATEWAY,
                format!("cannot reach the console of '{name}': {e}"),
            )
        }
        Err(e) => return crate::api::error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    upgrade.on_upgrade(move |socket| stratus_protocol::console::bridge(socket, console)).into_response()
}
