//! Operations (show, wait) and the event log.

use super::*;

pub(super) async fn get_operation(State(state): State<Shared>, Name(id): Name) -> ApiResult<Json<Operation>> {
    state
        .db
        .operation(&id)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("operation '{id}' not found")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    /// Seconds, at most 300.
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    token: Option<String>,
}

pub(super) async fn wait_operation(
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
pub(super) struct EventsQuery {
    #[serde(default)]
    instance: Option<String>,
    /// Only events after this time (Unix milliseconds).
    #[serde(default)]
    after: u64,
    #[serde(default)]
    token: Option<String>,
}

pub(super) async fn list_events(
    State(state): State<Shared>,
    Params(query): Params<EventsQuery>,
) -> ApiResult<Json<Vec<stratus_api::model::Event>>> {
    let _ = query.token;
    Ok(Json(state.db.events(query.instance.as_deref(), query.after)?))
}
