//! The web dashboard: one self-contained page (HTML, CSS and JavaScript inline, no external
//! requests) served at `/`. It logs in with the API token and drives the `/v1` REST API and the
//! console WebSocket from the browser, so it needs no routes of its own beyond the page.

use std::sync::Arc;

use axum::{response::Html, routing::get, Router};

use crate::api::AppState;

/// Routes of the dashboard: `/` (the page).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/", get(|| async { Html(include_str!("dashboard/index.html")) }))
}
