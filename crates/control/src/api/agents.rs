//! The routes host agents call: join, heartbeat, and the image files they copy.

use super::*;

/// `POST /agent/v1/join`: an agent trades its join token for its host's credential.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinRequest {
    token: String,
    host: stratus_protocol::HostInfo,
}

#[derive(Serialize)]
pub(super) struct JoinAnswer {
    credential: String,
    protocol: u32,
}

pub(super) async fn agent_join(
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
pub(super) async fn agent_heartbeat(
    State(state): State<Shared>,
    headers: HeaderMap,
    Body(info): Body<stratus_protocol::HostInfo>,
) -> ApiResult<Json<stratus_protocol::HeartbeatAnswer>> {
    let secret = bearer(&headers);
    let beating = Arc::clone(&state);
    tokio::task::spawn_blocking(move || {
        beating.cluster.authenticate(&info.name, &secret)?;
        beating.cluster.heartbeat(&info)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let lease_ms = state.cluster.liveness().as_millis().try_into().unwrap_or(u64::MAX);
    Ok(Json(stratus_protocol::HeartbeatAnswer { lease_ms }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentQuery {
    host: String,
}

/// `GET /agent/v1/images/{dir}/{file}?host=NAME`, with host NAME's credential as the bearer
/// token: a file of an image this control plane keeps, for an agent copying it
/// (`stratus_agent::images`). Only the files of images on record are served.
pub(super) async fn agent_image_file(
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
    let (opened, length) = image_file(&state, &dir, &file)?;
    state.db.event(
        DEFAULT_PROJECT,
        "",
        "info",
        format!("host {}: copying image file {dir}/{file} ({} MiB)", query.host, length >> 20),
    );
    Ok(axum::body::Body::new(FileBody::spawn(opened, length)).into_response())
}

/// `GET /v1/image-files/{dir}/{file}`, with the API token: a file of an image on record, for
/// another control plane replica that lacks it (`imagesync`).
pub(super) async fn replica_image_file(
    State(state): State<Shared>,
    Path((dir, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (opened, length) = image_file(&state, &dir, &file)?;
    Ok(axum::body::Body::new(FileBody::spawn(opened, length)).into_response())
}

/// Image file `DIR/FILE` here, open, with its length: only the files of images on record.
fn image_file(state: &AppState, dir: &str, file: &str) -> ApiResult<(std::fs::File, u64)> {
    if !stratus_agent::images::valid_dir(dir) || !stratus_agent::images::IMAGE_FILES.contains(&file) {
        return Err(ApiError::bad_request(format!("no image file '{dir}/{file}'")));
    }
    let images = state.db.list::<Image>("/images/")?;
    let path = state.data_dir.join("images").join(dir).join(file);
    let opened =
        if crate::imagesync::on_record(&images, dir, file) { std::fs::File::open(&path).ok() } else { None };
    let Some(opened) = opened else {
        return Err(ApiError::not_found(format!("no image file '{dir}/{file}' here")));
    };
    let length =
        opened.metadata().map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?.len();
    Ok((opened, length))
}

/// A file's bytes as a response body, read on a blocking thread a MiB at a time.
pub(super) struct FileBody {
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
