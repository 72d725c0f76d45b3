//! An instance's serial console over a WebSocket (`GET /v1/instances/{name}/console`): binary
//! messages carry the console's bytes both ways, bridged to the VMM's console socket. The CLI's
//! `stratus console` and the dashboard's terminal both use it.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{AppState, Name};
use crate::model::{InstanceState, DEFAULT_PROJECT};

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
    if !state.hosts.is_local(&instance.status.host) {
        // Its console socket is on that machine; the agent protocol does not carry it yet.
        return crate::api::error(
            axum::http::StatusCode::NOT_IMPLEMENTED,
            format!(
                "instance '{name}' runs on host '{}': consoles of other hosts are not proxied yet (exec is: `stratus exec {name} -- ...`)",
                instance.status.host
            ),
        );
    }
    let path = agent.console_socket(&instance);
    let stream = match stratus_unix::connect(&path)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::UnixStream::from_std)
    {
        Ok(s) => s,
        Err(e) => {
            return crate::api::error(
                axum::http::StatusCode::BAD_GATEWAY,
                format!("cannot reach the console: {e}"),
            )
        }
    };
    upgrade.on_upgrade(move |socket| bridge(socket, stream)).into_response()
}

async fn bridge(mut socket: WebSocket, stream: tokio::net::UnixStream) {
    let (mut from_vm, mut to_vm) = stream.into_split();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        tokio::select! {
            read = from_vm.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if to_vm.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if to_vm.write_all(text.as_bytes()).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
