//! Images: import from uploads, build from a recipe, show, list, delete; uploads.

use super::*;

pub(super) async fn list_images(State(state): State<Shared>) -> ApiResult<Json<Vec<Image>>> {
    Ok(Json(state.db.list(&format!("/images/{DEFAULT_PROJECT}/"))?))
}

/// `POST /v1/images`: import from files on the server's host.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ImportRequest {
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
    /// Replace an image of that name (refused while instances use it).
    #[serde(default)]
    replace: bool,
}

/// Names that are routes under /v1/images.
pub(super) const RESERVED_IMAGE_NAMES: &[&str] = &["build"];

pub(super) fn check_image_name(name: &str) -> ApiResult<()> {
    check_name("image", name).map_err(ApiError::bad_request)?;
    if RESERVED_IMAGE_NAMES.contains(&name) {
        return Err(ApiError::bad_request(format!("'{name}' is reserved; choose another image name")));
    }
    Ok(())
}

pub(super) async fn import_image(
    State(state): State<Shared>,
    Body(req): Body<ImportRequest>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    check_image_name(&req.name)?;
    if req.rootfs.is_some() == req.tarball.is_some() {
        return Err(ApiError::unprocessable("give either rootfs (a raw ext4 image) or tarball"));
    }
    if state.db.image(DEFAULT_PROJECT, &req.name)?.is_some() {
        if !req.replace {
            return Err(ApiError::conflict(format!(
                "image '{}' exists: import under another name, or ask to replace it (replace: true; --replace)",
                req.name
            )));
        }
        let users = image_users(&state, &req.name)?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "image '{}' is used by {}: it cannot be replaced under them",
                req.name,
                users.join(", ")
            )));
        }
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
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BuildRequest {
    recipe: String,
    #[serde(default)]
    name: Option<String>,
}

pub(super) async fn build_image(
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

pub(super) async fn get_image(State(state): State<Shared>, Name(name): Name) -> ApiResult<Json<Image>> {
    state
        .db
        .image(DEFAULT_PROJECT, &name)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("image '{name}' not found")))
}

/// The largest file an upload takes.
pub(super) const MAX_UPLOAD_BYTES: u64 = 1 << 40;

/// Where upload `name` is kept.
pub(super) fn upload_path(state: &AppState, name: &str) -> std::path::PathBuf {
    state.data_dir.join("uploads").join(name)
}

/// `PUT /v1/uploads/{name}`: a file for an image import (kernel, initrd, root filesystem or
/// tarball), streamed into the server's data directory. Imports name uploads, never host
/// paths: the API reads no file of the host it was not given.
pub(super) async fn upload(
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

pub(super) async fn delete_upload(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
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
pub(super) fn uploaded(state: &AppState, what: &str, name: &str) -> ApiResult<std::path::PathBuf> {
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

/// The instances that use image `name` (those being deleted too: their VMMs may still run
/// its kernel), by name.
fn image_users(state: &AppState, name: &str) -> ApiResult<Vec<String>> {
    Ok(state.db.instances()?.into_iter().filter(|i| i.spec.image == name).map(|i| i.name).collect())
}

pub(super) async fn delete_image(State(state): State<Shared>, Name(name): Name) -> ApiResult<StatusCode> {
    let image = state
        .db
        .image(DEFAULT_PROJECT, &name)?
        .ok_or_else(|| ApiError::not_found(format!("image '{name}' not found")))?;
    let users = image_users(&state, &name)?;
    if !users.is_empty() {
        return Err(ApiError::conflict(format!("image '{name}' is used by {}", users.join(", "))));
    }
    state.db.delete(&image_key(DEFAULT_PROJECT, &name))?;
    if let Some(dir) = std::path::Path::new(&image.rootfs).parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(StatusCode::NO_CONTENT)
}
